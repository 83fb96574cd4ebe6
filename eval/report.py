"""Run reports: one JSON, one Markdown page and PNG plots, readable at a glance.

    paths = write_report("runs/d20/report", base=core_and_bpb_results, chat=chatcore_results,
                         training=pretrain_summary, sft_history=trainer_state["log_history"])
    paths["markdown"], paths["json"], paths["plots"]

Plots (matplotlib, Agg backend, no display needed):
- `training.png`: pretraining loss and validation bpb against the step (from `summary.json`'s history,
  which mirrors what the tracker logged), plus SFT loss from `trainer_state.json` when there is one;
- `core.png`: centered accuracy per CORE task (0 = random guessing), with the CORE score;
- `chatcore.png`: accuracy per ChatCORE task with each task's random baseline;
- `reference.png`: CORE next to the original's reference numbers (GPT-2 = 0.2565 and the nanochat
  leaderboard, spec §11.1). A CORE-subset score is drawn hatched and labelled "not comparable".

`collect_report(folder)` gathers whatever a run left behind (base_eval.json, chat_eval.json, summary.json,
trainer_state.json) so the speedrun and the model card can regenerate the report from files.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

GPT2_CORE = 0.256525
# spec §11.1: (label, CORE, val bpb, note); val bpb is only comparable on the same data and tokenizer
LEADERBOARD = [
    ("GPT-2 1.5B (2019)", GPT2_CORE, None, "OpenAI, 32 TPU v3 x 168 h"),
    ("nanochat d24 (Jan 2026)", 0.2585, 0.74833, "3.04 h on 8xH100, FineWeb-EDU"),
    ("nanochat d24 (Mar 2026)", 0.2571, 0.71854, "2.02 h on 8xH100, ClimbMix"),
    ("nanochat d24 (Mar 14 2026)", 0.2626, 0.71800, "1.65 h on 8xH100, ClimbMix"),
]


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


# --------------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training(path: Path, history: list[dict], sft_history: list[dict] | None = None) -> Path | None:
    """Train loss and val bpb (pretraining), and SFT loss, against the step. None if nothing to draw."""
    train = [(h["step"], h["train_loss"]) for h in history if _finite(h.get("train_loss"))]
    val = [(h["step"], h["val_bpb"]) for h in history if _finite(h.get("val_bpb"))]
    sft = [(h["step"], h["loss"]) for h in (sft_history or []) if _finite(h.get("loss")) and "step" in h]
    sft_eval = [(h["step"], h["eval_loss"]) for h in (sft_history or []) if _finite(h.get("eval_loss"))]
    panels = [p for p in (("pretraining loss", train, "train loss (nats/token)", None),
                          ("validation bits per byte", val, "val bpb", None),
                          ("SFT loss", sft, "loss (nats/token)", sft_eval)) if p[1]]
    if not panels:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
    for ax, (title, points, ylabel, extra) in zip(axes[0], panels):
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3, lw=1.8, color="#1f77b4", label=ylabel)
        if extra:
            ex, ey = zip(*extra)
            ax.plot(ex, ey, marker="s", ms=4, lw=1.5, color="#d62728", label="eval loss")
            ax.legend(fontsize=8)
        ax.set_title(f"{title}: {ys[-1]:.4f} at step {xs[-1]}", fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_core(path: Path, core: dict) -> Path:
    """Horizontal bars of centered accuracy per task, green above chance, red below."""
    plt = _plt()
    tasks = list(core["tasks"].items())
    fig, ax = plt.subplots(figsize=(8, 0.34 * len(tasks) + 1.6))
    labels = [label for label, _ in tasks]
    values = [r["centered"] for _, r in tasks]
    colors = ["#2ca02c" if v >= 0 else "#d62728" for v in values]
    ax.barh(labels, values, color=colors)
    ax.axvline(0, color="black", lw=0.8)
    for y, v in enumerate(values):
        ax.text(v, y, f" {v:+.3f}", va="center", ha="left" if v >= 0 else "right", fontsize=8)
    ax.invert_yaxis()
    bundle = core.get("bundle", {})
    name = "CORE subset" if bundle.get("subset") else "CORE"
    ax.set_title(f"{name} = {core['core']:.4f}  ({len(tasks)} tasks; 0 = random guessing, 1 = perfect)", fontsize=10)
    ax.set_xlabel("centered accuracy")
    lo, hi = min(values + [0]), max(values + [0])
    pad = 0.25 * max(hi - lo, 0.1)
    ax.set_xlim(lo - pad, hi + pad)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_chatcore(path: Path, chat: dict) -> Path:
    """Accuracy per ChatCORE task with its random baseline marked."""
    plt = _plt()
    tasks = list(chat["tasks"].items())
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(tasks) + 2), 3.8))
    names = [n for n, _ in tasks]
    acc = [r["accuracy"] for _, r in tasks]
    ax.bar(names, acc, color=["#1f77b4" if r["kind"] == "categorical" else "#ff7f0e" for _, r in tasks])
    for x, (_, r) in enumerate(tasks):
        ax.hlines(r["baseline"], x - 0.4, x + 0.4, colors="black", linestyles="dashed", lw=1)
        ax.text(x, r["accuracy"], f"{r['accuracy']:.3f}", ha="center", va="bottom", fontsize=8)
    score = chat.get("chatcore")
    title = f"ChatCORE = {score:.4f}" if _finite(score) else "ChatCORE tasks (not all six run)"
    ax.set_title(f"{title}  (dashed: random baseline; blue categorical, orange generative)", fontsize=9)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, max(1.0, max(acc) * 1.15))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_reference(path: Path, core: dict) -> Path:
    """This model's CORE beside GPT-2 and the nanochat leaderboard."""
    plt = _plt()
    subset = bool(core.get("bundle", {}).get("subset"))
    names = [("this model\n(CORE subset,\nnot comparable)" if subset else "this model")]
    names += [label.replace(" (", "\n(") for label, *_ in LEADERBOARD]
    values = [core["core"]] + [v for _, v, _, _ in LEADERBOARD]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    bars = ax.bar(names, values, color=["#ff7f0e"] + ["#7f7f7f"] * len(LEADERBOARD))
    if subset:
        bars[0].set_hatch("//")
        bars[0].set_edgecolor("black")
    ax.axhline(GPT2_CORE, color="#d62728", ls="--", lw=1, label=f"GPT-2 CORE {GPT2_CORE:.4f}")
    for bar, v in zip(bars, values):
        ax.text(bar.get_x() + bar.get_width() / 2, v, f"{v:.4f}", ha="center", va="bottom" if v >= 0 else "top",
                fontsize=8)
    ax.set_ylabel("CORE")
    ax.set_title("CORE vs the original's reference numbers (spec §11.1)", fontsize=10)
    ax.tick_params(axis="x", labelsize=8)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- markdown
def _fmt(x: Any, digits: int = 4) -> str:
    if isinstance(x, float):
        return f"{x:.{digits}f}" if math.isfinite(x) else str(x)
    return "–" if x is None else str(x)


def render_markdown(report: dict, plots: dict[str, str]) -> str:
    """The Markdown page of a report dict (see `write_report`)."""
    lines = [f"# {report.get('title', 'nanochat-hf report')}", "",
             f"Generated {report['generated']}" + (f" for `{report['model']}`" if report.get("model") else "") + ".", ""]
    base, chat, training = report.get("base") or {}, report.get("chat") or {}, report.get("training") or {}
    core = base.get("core_eval")
    rows = []
    if core:
        label = "CORE subset" if core["bundle"].get("subset") else "CORE"
        ref = "not comparable (subset)" if core["bundle"].get("subset") else f"GPT-2 {GPT2_CORE:.4f}"
        rows.append((label, _fmt(core["core"]), ref))
    for split, value in (base.get("bpb") or {}).items():
        rows.append((f"{split} bpb", _fmt(value), "nanochat d24: 0.718 (ClimbMix; other data/tokenizer: not comparable)"))
    if chat:
        rows.append(("ChatCORE", _fmt(chat.get("chatcore")), "all six tasks" if chat.get("chatcore") is not None
                     else "needs all six tasks"))
        rows.append(("ChatCORE (categorical)", _fmt(chat.get("chatcore_cat")), "ARC-E, ARC-C, MMLU"))
    if training:
        rows.append(("pretraining steps", _fmt(training.get("step")), ""))
        rows.append(("min val bpb (training)", _fmt(training.get("min_val_bpb")), ""))
        rows.append(("training time (min)", _fmt((training.get("total_training_time") or 0) / 60, 2), "excludes evals"))
    if rows:
        lines += ["## Summary", "", "| metric | value | reference |", "|---|---|---|"]
        lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
        lines.append("")
    if "training" in plots:
        lines += ["## Training", "", f"![training curves]({plots['training']})", ""]
    if core:
        bundle = core["bundle"]
        lines += [f"## {'CORE subset' if bundle.get('subset') else 'CORE'}", "",
                  f"Bundle: {bundle.get('name')} — {len(core['tasks'])} tasks"
                  + (f", {core['max_per_task']} items per task at most" if core.get("max_per_task", -1) > 0 else "") + ".",
                  ""]
        if bundle.get("subset"):
            lines += [f"> {bundle.get('notes') or 'A subset of the 22 CORE tasks.'}", ""]
        lines += ["| task | type | shots | items | accuracy | random baseline | centered |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {t} | {r['task_type']} | {r['num_fewshot']} | {r['num_items']} | {_fmt(r['accuracy'])} | "
                  f"{r['random_baseline']:g}% | {_fmt(r['centered'])} |" for t, r in core["tasks"].items()]
        lines += [f"| **{'CORE subset' if bundle.get('subset') else 'CORE'}** | | | | | | **{_fmt(core['core'])}** |", ""]
        for key, alt in (("core", "CORE per task"), ("reference", "CORE vs reference")):
            if key in plots:
                lines += [f"![{alt}]({plots[key]})", ""]
    if base.get("samples"):
        lines += ["### Samples (greedy, 16 tokens)", ""] + [f"- `{s!r}`" for s in base["samples"]] + [""]
    if chat:
        lines += ["## ChatCORE", "", "| task | kind | problems | accuracy | baseline | centered |", "|---|---|---|---|---|---|"]
        lines += [f"| {n} | {r['kind']} | {r['num_problems']} | {_fmt(r['accuracy'])} | {r['baseline']:g} | "
                  f"{_fmt(r['centered'])} |" for n, r in chat["tasks"].items()]
        lines += [f"| **ChatCORE** | | | | | **{_fmt(chat.get('chatcore'))}** |", ""]
        if "chatcore" in plots:
            lines += [f"![ChatCORE per task]({plots['chatcore']})", ""]
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------- entry points
def write_report(out_dir: str | os.PathLike, *, base: dict | None = None, chat: dict | None = None,
                 training: dict | None = None, sft_history: list[dict] | None = None, model: str | None = None,
                 title: str = "nanochat-hf report") -> dict:
    """Write report.json, report.md and the plots into `out_dir`; returns their paths.

    base: {"core_eval": evaluate_core(...), "bpb": {"val": x, ...}, "samples": [...]}; chat: evaluate_chatcore(...);
    training: pretraining's summary.json (its "history" feeds the plot); sft_history: a Trainer's log_history.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots: dict[str, str] = {}
    history = (training or {}).get("history") or []
    if plot_training(out / "training.png", history, sft_history):
        plots["training"] = "training.png"
    core = (base or {}).get("core_eval")
    if core and core.get("tasks"):
        plots["core"] = plot_core(out / "core.png", core).name
        plots["reference"] = plot_reference(out / "reference.png", core).name
    if chat and chat.get("tasks"):
        plots["chatcore"] = plot_chatcore(out / "chatcore.png", chat).name
    training_summary = {k: v for k, v in (training or {}).items() if k not in ("history", "config", "plan")}
    report = {"title": title, "generated": time.strftime("%Y-%m-%d %H:%M:%S"), "model": model, "base": base,
              "chat": chat, "training": training_summary or None,
              "reference": {"gpt2_core": GPT2_CORE, "leaderboard": [dict(zip(("label", "core", "val_bpb", "note"), r))
                                                                   for r in LEADERBOARD]},
              "plots": plots}
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")
    (out / "report.md").write_text(render_markdown(report, plots), encoding="utf-8")
    return {"json": out / "report.json", "markdown": out / "report.md", "plots": [out / p for p in plots.values()]}


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def collect_report(out_dir: str | os.PathLike, model_dirs: list[str | os.PathLike] = (), **kwargs) -> dict:
    """Regenerate the report in `out_dir` from the files there (base_eval.json, chat_eval.json) and in the
    model folders (summary.json of pretraining, trainer_state.json of SFT)."""
    out = Path(out_dir)
    training, sft_history = None, None
    for folder in map(Path, model_dirs):
        training = training or _read_json(folder / "summary.json")
        state = _read_json(folder / "trainer_state.json")
        if state and sft_history is None:
            sft_history = state.get("log_history")
    return write_report(out, base=_read_json(out / "base_eval.json"), chat=_read_json(out / "chat_eval.json"),
                        training=training, sft_history=sft_history, **kwargs)
