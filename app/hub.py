"""`nanochat push FOLDER --repo-id ID`: publish a NanoChat folder on the Hugging Face Hub with a real model card.

    nanochat push runs/d20/sft --repo-id me/nanochat-d20 --dry-run       # writes runs/d20/sft-hub/, uploads nothing
    nanochat push runs/d20/sft --repo-id me/nanochat-d20 --private       # create the repo, one commit

What the Hub receives (checked before anything is written or sent; every problem is listed at once):
- `config.json` of a `nanochat_hf` model with its `auto_map`, and the custom code it names plus the files
  those import relatively (`configuration_nanochat.py`, `modeling_nanochat.py`, `cache_nanochat.py`);
- safetensors weights (`model.safetensors` or a sharded index) whose names and shapes match the config;
- the tokenizer (`tokenizer.json`, `tokenizer_config.json`, plus `chat_template.jinja` / `special_tokens_map.json`
  when present) with exactly `vocab_size` tokens, from the folder or from `--tokenizer DIR`;
- `generation_config.json` (derived from the config when the folder has none);
- provenance when present: `summary.json` (written by `nanochat pretrain`), `nanochat_meta.json` (the original
  checkpoint's meta, written by `nanochat convert from-original`);
- the eval report (below) and its plots under `report/`;
- `README.md`: the model card, built with `huggingface_hub.ModelCard` / `ModelCardData` (license, base model,
  datasets, pipeline tag, library, `model-index` eval results), with the architecture, the training recipe,
  the results and plots, usage (transformers with `trust_remote_code`, our server, Gradio) and limitations.

`--dry-run` writes exactly that tree to `--out` (default: `<FOLDER>-hub` next to the folder) and lists it.
Otherwise the same tree is staged in a temporary folder and sent with `HfApi.create_repo` (+ `create_branch`
for `--revision`) and one `HfApi.upload_folder` commit; the token comes from the usual places (`--token`,
`HF_TOKEN`, `hf auth login`), the endpoint from `--endpoint` or `HF_ENDPOINT`.

Eval results come from `--report PATH` (a JSON file, or a folder holding one) or, by default, from the folder's
`report/`. Two formats are read: the `report.json` that `nanochat eval` writes (eval/report.py: CORE, bits per
byte, ChatCORE and its tasks, plots), and this simpler `results.json` for numbers from anywhere else, version 1:

    {
      "model_kind": "chat",                      # optional: "base" | "chat" | "rl", shown in the card
      "base_model": "me/nanochat-d20-base",      # optional: Hub id of the model this one was trained from
      "datasets": ["karpathy/fineweb-edu-100b-shuffle"],   # optional: Hub ids of training data
      "results": [                               # required (may be empty): one entry per number
        {"task": "CORE", "metric": "core", "value": 0.2219,           # required: task, metric, value (number)
         "dataset": "CORE (DCLM eval bundle)", "dataset_id": "core",  # optional: display name / Hub id or slug
         "split": "test", "task_type": "text-generation",             # optional (task_type default text-generation)
         "metric_name": "CORE centered accuracy"}                     # optional display name of the metric
      ],
      "training": {"tokens": 11200000000, "hardware": "8xH100"},      # optional: flat settings for the recipe table
      "plots": ["loss.png", "eval.png"]          # optional: PNGs relative to the report's folder (default: all *.png)
    }
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPORT_FILE = "results.json"  # our simple schema (module docstring)
EVAL_REPORT_FILE = "report.json"  # what `nanochat eval` writes (eval/report.py)
REPORT_DIR = "report"
# ChatCORE task -> Hub dataset id, for the model-index
CHAT_TASK_DATASETS = {"ARC-Easy": "allenai/ai2_arc", "ARC-Challenge": "allenai/ai2_arc", "MMLU": "cais/mmlu",
                      "GSM8K": "openai/gsm8k", "HumanEval": "openai/openai_humaneval"}
TOKENIZER_REQUIRED = ("tokenizer.json", "tokenizer_config.json")
TOKENIZER_OPTIONAL = ("special_tokens_map.json", "chat_template.jinja", "added_tokens.json")
PROVENANCE_FILES = ("summary.json", "nanochat_meta.json")
MODEL_TYPE = "nanochat_hf"
NANOCHAT_URL = "https://github.com/karpathy/nanochat"
_RELATIVE_IMPORT = re.compile(r"^\s*from\s+\.(\w+)\s+import\s", re.MULTILINE)


class HubFolderError(ValueError):
    """A folder (or report) that cannot be published as is; the message lists every problem."""


# --------------------------------------------------------------------------- eval report
@dataclass
class EvalReport:
    """A parsed `results.json` (schema in the module docstring)."""

    path: Path
    results: list[dict[str, Any]] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)
    training: dict[str, Any] = field(default_factory=dict)
    model_kind: str | None = None
    base_model: str | None = None
    datasets: list[str] = field(default_factory=list)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load_report(path: str | os.PathLike) -> EvalReport:
    """Read and validate an eval report (either format, see the module docstring; a folder means its
    results.json, else its report.json); errors name the file and the field (e.g. `results[2].value`)."""
    path = Path(path)
    if path.is_dir():
        path = path / REPORT_FILE if (path / REPORT_FILE).is_file() else path / EVAL_REPORT_FILE
    if not path.is_file():
        raise HubFolderError(f"eval report not found: {path}")
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise HubFolderError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise HubFolderError(f"{path} must hold a JSON object, got {type(data).__name__}")
    if "results" not in data and ("base" in data or "chat" in data):
        return _from_eval_report(data, path)
    problems = []
    results = data.get("results")
    if not isinstance(results, list):
        problems.append(f"'results' must be a list, got {type(results).__name__}")
        results = []
    for i, r in enumerate(results):
        where = f"results[{i}]"
        if not isinstance(r, dict):
            problems.append(f"{where} must be an object, got {type(r).__name__}")
            continue
        for key in ("task", "metric"):
            if not isinstance(r.get(key), str) or not r.get(key):
                problems.append(f"{where}.{key} must be a non-empty string, got {r.get(key)!r}")
        if not _is_number(r.get("value")):
            problems.append(f"{where}.value must be a finite number, got {r.get('value')!r}")
        for key in ("dataset", "dataset_id", "split", "task_type", "metric_name"):
            if key in r and not isinstance(r[key], str):
                problems.append(f"{where}.{key} must be a string, got {r[key]!r}")
        extra = sorted(set(r) - {"task", "metric", "value", "dataset", "dataset_id", "split", "task_type",
                                 "metric_name"})
        if extra:
            problems.append(f"{where} has unknown field(s) {extra}")
    for key in ("model_kind", "base_model"):
        if data.get(key) is not None and not isinstance(data[key], str):
            problems.append(f"'{key}' must be a string, got {data[key]!r}")
    datasets = data.get("datasets", [])
    if isinstance(datasets, str):
        datasets = [datasets]
    if not isinstance(datasets, list) or not all(isinstance(d, str) for d in datasets):
        problems.append(f"'datasets' must be a list of Hub dataset ids, got {data.get('datasets')!r}")
        datasets = []
    training = data.get("training", {})
    if not isinstance(training, dict):
        problems.append(f"'training' must be an object, got {type(training).__name__}")
        training = {}
    plots_field = data.get("plots")
    if plots_field is None:
        plots = sorted(path.parent.glob("*.png"))
    elif isinstance(plots_field, list) and all(isinstance(p, str) for p in plots_field):
        plots = [path.parent / p for p in plots_field]
        for p, name in zip(plots, plots_field):
            if not p.is_file():
                problems.append(f"plot {name!r} listed in 'plots' is not a file in {path.parent}")
            elif Path(name).is_absolute() or ".." in Path(name).parts:
                problems.append(f"plot {name!r} must be a path inside {path.parent}")
    else:
        problems.append(f"'plots' must be a list of file names, got {plots_field!r}")
        plots = []
    unknown = sorted(set(data) - {"results", "plots", "training", "model_kind", "base_model", "datasets",
                                  "version", "generated_by"})
    if unknown:
        problems.append(f"unknown top-level field(s) {unknown}")
    if problems:
        raise HubFolderError(f"{path} does not follow the report schema (see app/hub.py):\n  - " + "\n  - ".join(problems))
    return EvalReport(path=path, results=results, plots=plots, training=training, model_kind=data.get("model_kind"),
                      base_model=data.get("base_model"), datasets=datasets)


def _from_eval_report(data: dict[str, Any], path: Path) -> EvalReport:
    """The numbers of a `nanochat eval` report.json (eval/report.py) in our result form."""
    results: list[dict[str, Any]] = []
    base = data.get("base") if isinstance(data.get("base"), dict) else {}
    chat = data.get("chat") if isinstance(data.get("chat"), dict) else {}
    core = base.get("core_eval") if isinstance(base.get("core_eval"), dict) else {}
    if _is_number(core.get("core")):
        bundle = core.get("bundle") if isinstance(core.get("bundle"), dict) else {}
        subset = bool(bundle.get("subset"))
        results.append({"task": "CORE subset" if subset else "CORE", "metric": "core", "value": core["core"],
                        "dataset": str(bundle.get("name") or "CORE"), "dataset_id": "core-subset" if subset else "core",
                        "metric_name": "CORE (mean centered accuracy)"})
    bpb = base.get("bpb") if isinstance(base.get("bpb"), dict) else {}
    for split, value in bpb.items():
        if _is_number(value):
            results.append({"task": "bits per byte", "metric": "bpb", "value": value, "dataset": "pretraining data",
                            "dataset_id": "pretraining-data", "split": str(split)})
    for key, label in (("chatcore", "ChatCORE"), ("chatcore_cat", "ChatCORE (categorical)")):
        if _is_number(chat.get(key)):
            results.append({"task": label, "metric": key, "value": chat[key], "dataset": label,
                            "dataset_id": "chatcore", "metric_name": f"{label} (mean centered accuracy)"})
    tasks = chat.get("tasks") if isinstance(chat.get("tasks"), dict) else {}
    for name, r in tasks.items():
        if isinstance(r, dict) and _is_number(r.get("accuracy")):
            results.append({"task": str(name), "metric": "accuracy", "value": r["accuracy"], "dataset": str(name),
                            "dataset_id": CHAT_TASK_DATASETS.get(name, ""), "split": "test"})
    plots_field = data.get("plots") if isinstance(data.get("plots"), dict) else {}
    plots = [path.parent / p for p in plots_field.values() if isinstance(p, str) and (path.parent / p).is_file()]
    training = data.get("training") if isinstance(data.get("training"), dict) else {}
    training = {f"pretraining {k}": v for k, v in training.items() if isinstance(v, (str, int, float, bool))}
    if not results:
        raise HubFolderError(f"{path} (a `nanochat eval` report) holds no numbers: no CORE, bpb or ChatCORE results")
    return EvalReport(path=path, results=results, plots=plots, training=training,
                      model_kind="chat" if chat else "base")


# --------------------------------------------------------------------------- folder check
def _code_files(folder: Path, config: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(present, missing) code files: the auto_map modules and, recursively, their relative imports."""
    auto_map = config.get("auto_map") or {}
    pending = []
    for ref in auto_map.values():
        refs = ref if isinstance(ref, list) else [ref]
        for r in refs:
            if isinstance(r, str) and "--" not in r:  # "org/repo--module.Class" lives in another repo
                pending.append(r.rsplit(".", 1)[0] + ".py")
    present, missing, seen = [], [], set()
    while pending:
        name = pending.pop(0)
        if name in seen:
            continue
        seen.add(name)
        path = folder / name
        if not path.is_file():
            missing.append(name)
            continue
        present.append(name)
        pending.extend(m + ".py" for m in _RELATIVE_IMPORT.findall(path.read_text(encoding="utf-8")))
    return present, missing


def _weight_files(folder: Path) -> tuple[list[str], list[str]]:
    """(weight files to upload, problems)."""
    if (folder / "model.safetensors").is_file():
        return ["model.safetensors"], []
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            return [], [f"{index.name} is not a safetensors index: {e}"]
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            return [], [f"{index.name} lists shards that are missing: {', '.join(missing)}"]
        return [index.name, *shards], []
    if (folder / "pytorch_model.bin").is_file():
        return [], ["weights are pytorch_model.bin (pickle): the Hub folder takes safetensors only; re-save with "
                    "model.save_pretrained(folder)"]
    return [], ["no weights: expected model.safetensors or model.safetensors.index.json"]


def _check_weights(folder: Path, files: list[str], config) -> list[str]:
    """Names and shapes of the safetensors tensors against what a model of `config` holds."""
    from safetensors import safe_open

    from modeling_nanochat.convert_nanochat_checkpoint import state_dict_problems

    shapes: dict[str, tuple[int, ...]] = {}
    for name in files:
        if not name.endswith(".safetensors"):
            continue
        try:
            with safe_open(folder / name, framework="pt") as f:
                for key in f.keys():
                    shapes[key] = tuple(f.get_slice(key).get_shape())
        except Exception as e:  # a truncated or foreign file: say which
            return [f"{name} is not a readable safetensors file: {e}"]
    return [f"weights do not match config.json: {p}" for p in state_dict_problems(shapes, config)]


@dataclass
class HubFolder:
    """A checked folder: what to upload (path in repo -> source file) and what the card is built from."""

    folder: Path
    files: dict[str, Path]
    config: Any
    tokenizer: Any
    has_generation_config: bool
    summary: dict[str, Any] | None
    original_meta: dict[str, Any] | None


def check_folder(folder: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None) -> HubFolder:
    """Check that `folder` is complete for the Hub (config, code, weights, tokenizer); raise HubFolderError
    listing every problem."""
    from transformers import AutoTokenizer

    from modeling_nanochat import NanoChatConfig

    folder = Path(folder)
    if not folder.is_dir():
        raise HubFolderError(f"{folder} is not a folder")
    problems: list[str] = []
    files: dict[str, Path] = {}
    config_path = folder / "config.json"
    raw: dict[str, Any] = {}
    config = None
    if not config_path.is_file():
        problems.append("config.json is missing")
    else:
        try:
            raw = json.loads(config_path.read_text())
        except ValueError as e:
            problems.append(f"config.json is not valid JSON: {e}")
        if raw and raw.get("model_type") != MODEL_TYPE:
            hint = " (convert it first: nanochat convert from-transformers)" if raw.get("model_type") == "nanochat" else ""
            problems.append(f"config.json has model_type {raw.get('model_type')!r}, expected {MODEL_TYPE!r}{hint}")
        elif raw:
            try:
                config = NanoChatConfig.from_pretrained(folder)
            except (ValueError, TypeError) as e:
                problems.append(f"config.json is not a valid NanoChatConfig: {e}")
            files["config.json"] = config_path
            if not raw.get("auto_map"):
                problems.append("config.json has no auto_map, so the Hub copy would not load with trust_remote_code "
                                "(save the model with save_pretrained from modeling_nanochat)")
            present, missing = _code_files(folder, raw)
            files.update({name: folder / name for name in present})
            if missing:
                problems.append(f"custom code files named by auto_map (or imported by them) are missing: {', '.join(missing)}")
    weights, weight_problems = _weight_files(folder)
    problems += weight_problems
    files.update({name: folder / name for name in weights})
    if config is not None and weights:
        problems += _check_weights(folder, weights, config)
    tok_dir = Path(tokenizer_dir) if tokenizer_dir else folder
    tokenizer = None
    missing_tok = [name for name in TOKENIZER_REQUIRED if not (tok_dir / name).is_file()]
    if missing_tok:
        hint = "" if tokenizer_dir else " (pass --tokenizer DIR to take it from another folder)"
        problems.append(f"tokenizer files missing in {tok_dir}: {', '.join(missing_tok)}{hint}")
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        except Exception as e:  # whatever transformers raises for a broken tokenizer, name the folder
            problems.append(f"the tokenizer in {tok_dir} does not load: {e}")
        if tokenizer is not None and config is not None and len(tokenizer) != config.vocab_size:
            problems.append(f"vocab mismatch: the tokenizer in {tok_dir} has {len(tokenizer)} tokens, "
                            f"config.json has vocab_size {config.vocab_size}")
        for name in TOKENIZER_REQUIRED + TOKENIZER_OPTIONAL:
            if (tok_dir / name).is_file():
                files[name] = tok_dir / name
    has_gen = (folder / "generation_config.json").is_file()
    if has_gen:
        files["generation_config.json"] = folder / "generation_config.json"
    docs = {}
    for name in PROVENANCE_FILES:
        if (folder / name).is_file():
            try:
                docs[name] = json.loads((folder / name).read_text())
                files[name] = folder / name
            except ValueError as e:
                problems.append(f"{name} is not valid JSON: {e}")
    if problems:
        raise HubFolderError(f"{folder} is not ready for the Hub:\n  - " + "\n  - ".join(problems))
    return HubFolder(folder=folder, files=files, config=config, tokenizer=tokenizer, has_generation_config=has_gen,
                     summary=docs.get("summary.json"), original_meta=docs.get("nanochat_meta.json"))


# --------------------------------------------------------------------------- model card
def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
            return f"{value:.4g}"
        return f"{value:.4f}".rstrip("0").rstrip(".")
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10_000:
        return f"{value:,}"
    text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _table(rows: list[tuple[str, Any]], header: tuple[str, str] = ("setting", "value")) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in rows if v is not None and not isinstance(v, (dict, list))]
    return "\n".join(lines)


def _recipe_rows(hub: HubFolder, report: EvalReport | None) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    summary = hub.summary or {}
    if summary:
        cfg, plan = summary.get("config") or {}, summary.get("plan") or {}
        rows += [
            ("stage", "pretraining (`nanochat pretrain`, Muon + AdamW, Accelerate)"),
            ("depth", cfg.get("depth")),
            ("data", cfg.get("data")),
            ("optimizer steps", summary.get("step")),
            ("tokens per step", plan.get("total_batch_size")),
            ("training tokens", plan.get("target_tokens")),
            ("tokens : scaling params", cfg.get("target_param_data_ratio")),
            ("matrix LR (Muon)", cfg.get("matrix_lr")),
            ("embedding LR", cfg.get("embedding_lr")),
            ("unembedding LR", cfg.get("unembedding_lr")),
            ("warmup steps", cfg.get("warmup_steps")),
            ("warmdown ratio", cfg.get("warmdown_ratio")),
            ("final val bits per byte", summary.get("val_bpb")),
            ("min val bits per byte", summary.get("min_val_bpb")),
            ("training time (s)", summary.get("total_training_time")),
        ]
    meta = hub.original_meta or {}
    if meta:
        rows += [("stage", "original nanochat checkpoint, converted with `nanochat convert from-original`"),
                 ("step", meta.get("step")), ("val bits per byte", meta.get("val_bpb"))]
        user = meta.get("user_config") or {}
        rows += [(str(k), v) for k, v in user.items() if isinstance(v, (str, int, float, bool))]
    if report is not None:
        rows += [(str(k), v) for k, v in report.training.items()]
    return rows


def build_model_card(
    hub: HubFolder,
    repo_id: str,
    report: EvalReport | None = None,
    license: str = "mit",
    base_model: str | None = None,
    datasets: list[str] | None = None,
    language: str = "en",
):
    """The README.md of the Hub repo as a `huggingface_hub.ModelCard` (YAML metadata + Markdown body)."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    from modeling_nanochat import count_flops_and_params

    config = hub.config
    name = repo_id.split("/")[-1]
    _, params = count_flops_and_params(config)
    base_model = base_model or (report.base_model if report else None)
    if not datasets:
        datasets = list(report.datasets) if report and report.datasets else []
        data = ((hub.summary or {}).get("config") or {}).get("data")
        if not datasets and isinstance(data, str) and data.startswith("hf:"):
            datasets = [data[3:]]
    eval_results = []
    for r in (report.results if report else []):
        dataset_name = r.get("dataset", r["task"])
        dataset_type = r.get("dataset_id") or re.sub(r"[^a-z0-9]+", "-", dataset_name.lower()).strip("-") or "custom"
        eval_results.append(EvalResult(
            task_type=r.get("task_type", "text-generation"), task_name=r["task"],
            dataset_type=dataset_type, dataset_name=dataset_name, dataset_split=r.get("split"),
            metric_type=r["metric"], metric_value=r["value"], metric_name=r.get("metric_name", r["metric"]),
        ))
    card_data = ModelCardData(
        language=language, license=license, library_name="transformers", pipeline_tag="text-generation",
        tags=["nanochat", "nanochat-hf", "custom_code", "text-generation"], base_model=base_model,
        datasets=datasets or None, model_name=name, eval_results=eval_results or None,
    )
    kind = {"base": "base (pretrained)", "chat": "chat (supervised fine-tuned)", "rl": "chat (RL fine-tuned)"}.get(
        (report.model_kind if report else None) or "", "")
    origin = ("converted from an original nanochat checkpoint" if hub.original_meta is not None
              else "trained with nanochat-hf")
    windows = sorted(set(config.layer_windows))
    features = [f for f, on in (("value embeddings", config.use_value_embeds), ("smear", config.use_smear),
                                ("backout", config.use_backout), ("residual/x0 lambdas", config.use_residual_lambdas))
                if on]
    architecture = _table([
        ("parameters", params["total"]),
        ("scaling parameters (matrices + head)", params["transformer_matrices"] + params["lm_head"]),
        ("layers", config.num_hidden_layers), ("width", config.hidden_size),
        ("attention heads / KV heads", f"{config.num_attention_heads} / {config.num_key_value_heads}"),
        ("head dim", config.head_dim), ("MLP width (ReLU²)", config.intermediate_size),
        ("context (training sequence length)", config.max_position_embeddings),
        ("attention windows", f"pattern {config.window_pattern}, windows {windows} (last layer full)"),
        ("vocabulary", f"{config.vocab_size} (rows padded to {config.padded_vocab_size})"),
        ("RoPE base", config.rope_theta), ("QK-norm scale", config.qk_scale),
        ("logit softcap", config.final_logit_softcapping), ("nanochat features", ", ".join(features) or "none"),
        ("weights dtype", str(getattr(config, "dtype", None) or "float32").removeprefix("torch.")),
    ])
    recipe = _recipe_rows(hub, report)
    recipe_md = _table(recipe) if recipe else (
        "No training summary was found in the folder (`summary.json` from `nanochat pretrain`, or `training` in the "
        "eval report).")
    if report and report.results:
        lines = ["| task | dataset | metric | value |", "|---|---|---|---|"]
        lines += [f"| {_fmt(r['task'])} | {_fmt(r.get('dataset', r['task']))}{' (' + r['split'] + ')' if r.get('split') else ''} "
                  f"| {_fmt(r.get('metric_name', r['metric']))} | {_fmt(r['value'])} |" for r in report.results]
        results_md = "\n".join(lines)
    else:
        results_md = ("No evaluation report was found when this card was written (`report/results.json`; see "
                      "`nanochat eval`).")
    plots_md = "\n\n".join(f"![{p.stem}]({REPORT_DIR}/{p.name})" for p in (report.plots if report else []))
    chat = bool(getattr(hub.tokenizer, "chat_template", None))
    usage_transformers = f'''```python
from transformers import AutoModelForCausalLM, AutoTokenizer

# NanoChat's code ships in this repo; with trust_remote_code the tokenizer loads without a prompt too
tokenizer = AutoTokenizer.from_pretrained("{repo_id}", trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained("{repo_id}", trust_remote_code=True)
''' + ('''
messages = [{"role": "user", "content": "Why is the sky blue?"}]
ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
out = model.generate(**ids, max_new_tokens=128, do_sample=False)
print(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
''' if chat else "") + '''
# plain text continuation (the tokenizer prepends <|bos|>)
ids = tokenizer("The capital of France is", return_tensors="pt")
out = model.generate(**ids, max_new_tokens=32, do_sample=False)
print(tokenizer.decode(out[0], skip_special_tokens=True))
```'''
    body = f"""# {name}

`{name}` is a {kind + ' ' if kind else ''}[nanochat]({NANOCHAT_URL}) model ({params['total'] / 1e6:.1f}M parameters,
{config.num_hidden_layers} layers, width {config.hidden_size}, context {config.max_position_embeddings} tokens), {origin}.
nanochat-hf is Andrej Karpathy's nanochat rebuilt for the Hugging Face ecosystem: the model is a `transformers`
model (custom code in this repo, loaded with `trust_remote_code=True`), the tokenizer a standard fast tokenizer
with nanochat's chat template.

## Model details

{architecture}

The architecture is nanochat's (`gpt.py`): weightless RMSNorm, half-split RoPE, QK-norm, ReLU² MLP, untied
embedding and head, per-layer sliding windows and a logit softcap, plus the nanochat features listed above.

## Training recipe

{recipe_md}

## Evaluation

{results_md}

{plots_md}

## How to use

### transformers

{usage_transformers}

Generation uses the model's own `NanoChatCache` (sliding-window KV cache with the smear state); `generate()` picks it
automatically. Chat turns end with `<|assistant_end|>`.

### OpenAI- / TGI-compatible server and terminal chat

With nanochat-hf installed (`pip install -e .` in its repository):

```bash
hf download {repo_id} --local-dir {name}
nanochat serve {name} --port 8000     # /v1/chat/completions, /generate, and the Gradio chat UI at http://localhost:8000/
nanochat chat {name}                  # multi-turn chat in the terminal
```

```python
from openai import OpenAI

client = OpenAI(base_url="http://localhost:8000/v1", api_key="none")
reply = client.chat.completions.create(model="{name}", messages=[{{"role": "user", "content": "Hello!"}}])
print(reply.choices[0].message.content)
```

### Gradio

`nanochat serve` serves the Gradio chat app at `/`; `nanochat space {name} my-space` writes a ready-to-push Gradio
Space running the same app.

## Limitations

- A small model trained on a small compute budget: it makes factual mistakes, loses track in long conversations
  and can repeat itself. Do not rely on its answers.
- No safety tuning beyond the supervised chat data (if any): it can produce biased, offensive or wrong content.
- Trained mostly on English web text; other languages work poorly.
- The context is {config.max_position_embeddings} tokens; beyond it every attention layer slides its window.
- Calculator tool calls (`<|python_start|>…<|python_end|>`) are executed only by nanochat-hf's engine and server;
  plain `generate()` just emits the tokens.
- The model's code runs with `trust_remote_code=True`: read `modeling_nanochat.py` in this repo before using it.

## Credits

Architecture and training recipe: [nanochat]({NANOCHAT_URL}) by Andrej Karpathy (MIT). Packaged with nanochat-hf.
"""
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}")


# --------------------------------------------------------------------------- staging and upload
def _place(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)  # big weights: no copy when on the same filesystem
    except OSError:
        shutil.copy2(src, dst)


def find_report(folder: Path, report: str | os.PathLike | None) -> EvalReport | None:
    """`report` (file or folder) when given, else `<folder>/report/results.json` or `report.json` when present,
    else None."""
    if report is not None:
        return load_report(report)
    for name in (REPORT_FILE, EVAL_REPORT_FILE):
        if (folder / REPORT_DIR / name).is_file():
            return load_report(folder / REPORT_DIR / name)
    return None


def stage_hub_folder(
    folder: str | os.PathLike,
    out: str | os.PathLike,
    repo_id: str,
    tokenizer_dir: str | os.PathLike | None = None,
    report: str | os.PathLike | None = None,
    license: str = "mit",
    base_model: str | None = None,
    datasets: list[str] | None = None,
    language: str = "en",
) -> list[str]:
    """Write exactly what the Hub repo receives into `out` (which must not hold other files); return the
    paths in the repo, sorted."""
    from transformers import GenerationConfig

    _check_repo_id(repo_id)
    folder, out = Path(folder), Path(out)
    hub = check_folder(folder, tokenizer_dir)
    eval_report = find_report(folder, report)
    card = build_model_card(hub, repo_id, eval_report, license=license, base_model=base_model, datasets=datasets,
                            language=language)
    if out.resolve() == folder.resolve() or folder.resolve() in out.resolve().parents:
        raise HubFolderError(f"--out {out} must be outside the model folder {folder}")
    if out.exists() and any(out.iterdir()):
        # replace only a previous staging folder: a card written by us next to a config
        readme = out / "README.md"
        ours = readme.is_file() and (out / "config.json").is_file() and "- nanochat-hf" in readme.read_text()
        if not ours:
            raise HubFolderError(f"{out} exists and is not a folder written by `nanochat push`; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    files = dict(hub.files)
    if eval_report is not None:
        files[f"{REPORT_DIR}/{eval_report.path.name}"] = eval_report.path
        files.update({f"{REPORT_DIR}/{p.name}": p for p in eval_report.plots})
    for rel, src in files.items():
        _place(src, out / rel)
    if not hub.has_generation_config:
        GenerationConfig.from_model_config(hub.config).save_pretrained(out)
    card.save(out / "README.md")
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())


def _check_repo_id(repo_id: str) -> None:
    if not isinstance(repo_id, str) or not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        raise HubFolderError(f"--repo-id must look like 'user/model-name', got {repo_id!r}")


@dataclass
class PushResult:
    """What `push_to_hub` did: the files (paths in the repo), the staging folder, and the commit URL."""

    files: list[str]
    staged: Path | None
    commit_url: str | None


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    dry_run: bool = False,
    out: str | os.PathLike | None = None,
    token: str | None = None,
    api=None,
    endpoint: str | None = None,
    commit_message: str | None = None,
    **card_options: Any,
) -> PushResult:
    """Stage the folder (see the module docstring) and, unless `dry_run`, upload it in one commit.

    `api`: an `HfApi` (tests pass one with a local `endpoint`); otherwise one is built from `token`/`endpoint`.
    `card_options`: tokenizer_dir, report, license, base_model, datasets, language (see `stage_hub_folder`).
    Dry runs write to `out` (default `<folder>-hub`) and keep it; real pushes stage in a temporary folder
    unless `out` is given.
    """
    folder = Path(folder)
    if dry_run:
        staged = Path(out) if out else folder.with_name(folder.name + "-hub")
        files = stage_hub_folder(folder, staged, repo_id, **card_options)
        return PushResult(files=files, staged=staged, commit_url=None)
    from huggingface_hub import HfApi

    api = api or HfApi(endpoint=endpoint, token=token)
    with tempfile.TemporaryDirectory(prefix="nanochat-hub-") as tmp:
        staged = Path(out) if out else Path(tmp) / "repo"
        files = stage_hub_folder(folder, staged, repo_id, **card_options)
        api.create_repo(repo_id, private=True if private else None, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=staged, repo_type="model", revision=revision,
            commit_message=commit_message or f"Upload {repo_id.split('/')[-1]} with nanochat push",
            allow_patterns=files,
        )
    return PushResult(files=files, staged=Path(out) if out else None, commit_url=str(commit))


def _sizes(root: Path, files: list[str]) -> str:
    def human(n: int) -> str:
        for unit in ("B", "KB", "MB", "GB"):
            if n < 1024 or unit == "GB":
                return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
            n /= 1024
        return f"{n} B"

    return "\n".join(f"  {human((root / f).stat().st_size):>9}  {f}" for f in files)


def build_parser() -> argparse.ArgumentParser:
    """`nanochat push` options."""
    p = argparse.ArgumentParser(prog="nanochat push", description=__doc__.splitlines()[0])
    p.add_argument("folder", help="model folder (save_pretrained output with tokenizer, e.g. runs/d20/sft)")
    p.add_argument("--repo-id", required=True, help="Hub repo, e.g. your-name/nanochat-d20")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--revision", help="branch to commit to (created if missing; default: main)")
    p.add_argument("--dry-run", action="store_true", help="write what would be uploaded to --out and list it; upload nothing")
    p.add_argument("--out", help="staging folder (default for --dry-run: <FOLDER>-hub)")
    p.add_argument("--tokenizer", help="take the tokenizer from this folder instead of FOLDER")
    p.add_argument("--report", help=f"eval report JSON or its folder (default: FOLDER/{REPORT_DIR}/{REPORT_FILE} if present)")
    p.add_argument("--license", default="mit", help="license id in the card (default: mit, as nanochat)")
    p.add_argument("--base-model", help="Hub id of the model this one was fine-tuned from")
    p.add_argument("--dataset", dest="datasets", action="append", help="Hub id of a training dataset (repeatable)")
    p.add_argument("--language", default="en", help="language code for the card (default: en)")
    p.add_argument("--token", help="Hub token (default: HF_TOKEN or the one saved by `hf auth login`)")
    p.add_argument("--endpoint", help="Hub URL (default: HF_ENDPOINT or https://huggingface.co)")
    p.add_argument("--commit-message", help="commit message")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of `nanochat push`."""
    args = build_parser().parse_args(argv)
    options = dict(tokenizer_dir=args.tokenizer, report=args.report, license=args.license,
                   base_model=args.base_model, datasets=args.datasets, language=args.language)
    try:
        result = push_to_hub(args.folder, args.repo_id, private=args.private, revision=args.revision,
                             dry_run=args.dry_run, out=args.out, token=args.token, endpoint=args.endpoint,
                             commit_message=args.commit_message, **options)
    except HubFolderError as e:
        print(f"nanochat push: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # network / auth errors from huggingface_hub: one readable line, no traceback
        print(f"nanochat push: upload to {args.repo_id} failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    if args.dry_run:
        print(f"dry run: {len(result.files)} files would be uploaded to {args.repo_id}"
              f"{' (private)' if args.private else ''}{' @ ' + args.revision if args.revision else ''}; "
              f"written to {result.staged}:")
        print(_sizes(result.staged, result.files))
        print(f"model card: {result.staged / 'README.md'}")
    else:
        print(f"uploaded {len(result.files)} files to {args.repo_id}: {result.commit_url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
