"""`nanochat eval base|chat|report` on a tiny saved model, and the report's JSON, Markdown and PNG plots."""

from __future__ import annotations

import json

import pytest
from eval_testdata import save_model_folder, write_bundle
from PIL import Image

from app.cli import main as nanochat
from eval.report import GPT2_CORE, write_report

HISTORY = [{"step": 0, "val_bpb": 3.1}] + [{"step": s, "train_loss": 6 - 0.1 * s, "lrm": 1.0} for s in range(1, 21)]
HISTORY += [{"step": 10, "val_bpb": 2.6}, {"step": 20, "val_bpb": 2.2}]


def png_ok(path) -> bool:
    with Image.open(path) as image:
        return image.format == "PNG" and image.size[0] > 300 and image.size[1] > 200


def test_report_files_and_subset_labelling(tmp_path):
    core = {"core": 0.05, "max_per_task": -1, "tasks": {
        "copa": {"accuracy": 0.6, "centered": 0.2, "random_baseline": 50.0, "num_items": 100, "task_type": "multiple_choice", "num_fewshot": 0},
        "boolq": {"accuracy": 0.5, "centered": -0.3158, "random_baseline": 62.0, "num_items": 3270, "task_type": "multiple_choice", "num_fewshot": 10}},
        "bundle": {"name": "CORE subset (2/22)", "subset": True, "tasks": ["copa", "boolq"], "notes": "only two tasks"}}
    chat = {"chatcore": None, "chatcore_cat": None, "tasks": {
        "GSM8K": {"accuracy": 0.1, "centered": 0.1, "baseline": 0.0, "num_problems": 10, "kind": "generative"}}}
    sft = [{"step": 5, "loss": 2.0}, {"step": 10, "loss": 1.5}, {"step": 10, "eval_loss": 1.7}]
    paths = write_report(tmp_path, base={"core_eval": core, "bpb": {"val": 1.23}}, chat=chat,
                         training={"step": 20, "min_val_bpb": 2.2, "total_training_time": 90.0, "history": HISTORY},
                         sft_history=sft, model="runs/x/base")
    assert sorted(p.name for p in paths["plots"]) == ["chatcore.png", "core.png", "reference.png", "training.png"]
    assert all(png_ok(p) for p in paths["plots"])
    md = paths["markdown"].read_text()
    assert "| CORE subset | 0.0500 | not comparable (subset) |" in md and "> only two tasks" in md
    assert "![training curves](training.png)" in md and "| GSM8K | generative | 10 | 0.1000 | 0 | 0.1000 |" in md
    report = json.loads(paths["json"].read_text())
    assert report["reference"]["gpt2_core"] == GPT2_CORE and report["training"]["min_val_bpb"] == 2.2
    assert "history" not in report["training"]


def test_nanochat_eval_base_and_chat_write_one_report(tmp_path, capsys):
    from training.data import prepare_embedded_corpus

    folder = save_model_folder(tmp_path / "run" / "base")
    (folder / "summary.json").write_text(json.dumps({"step": 20, "min_val_bpb": 2.2, "history": HISTORY}))
    bundle = write_bundle(tmp_path / "bundle")
    prepare_embedded_corpus(tmp_path / "data", num_shards=2)
    assert nanochat(["eval", "base", str(folder), "--bundle", str(bundle), "--bpb-data", str(tmp_path / "data"),
                     "--bpb-tokens", "512", "--batch-rows", "4"]) == 0
    out = tmp_path / "run" / "report"
    base = json.loads((out / "base_eval.json").read_text())
    assert set(base["core_eval"]["tasks"]) == {"tiny_mc", "tiny_schema", "tiny_lm"} and base["bpb"]["val"] > 0
    assert len(base["samples"]) == 7 and (out / "core.csv").read_text().startswith("Task,Accuracy,Centered")
    assert nanochat(["eval", "chat", str(folder), "--tasks", "ARC-Easy|GSM8K", "--max-problems", "2",
                     "--max-new-tokens", "4", "--out", str(out)]) == 0
    chat = json.loads((out / "chat_eval.json").read_text())
    assert set(chat["tasks"]) == {"ARC-Easy", "GSM8K"} and chat["chatcore"] is None
    md = (out / "report.md").read_text()
    assert "## CORE" in md and "## ChatCORE" in md and "val bpb" in md and "## Training" in md
    assert all(png_ok(out / name) for name in ("training.png", "core.png", "reference.png", "chatcore.png"))
    printed = capsys.readouterr().out
    assert "CORE: " in printed and f"report: {out / 'report.md'}" in printed
    assert nanochat(["eval", "report", str(out), "--model-dir", str(folder)]) == 0


@pytest.mark.parametrize("argv, message", [
    (["eval", "base"], "needs a model folder"),
    (["eval", "base", "/nonexistent/model", "--bundle", "/nonexistent/bundle"], "does not exist"),
    (["eval", "chat", "--server", "http://127.0.0.1:9", "--model", "x"], "exactly one"),
    (["eval", "explode"], "unknown command"),
])
def test_cli_errors_are_clear(argv, message, capsys):
    assert nanochat(argv) == 2
    assert message in capsys.readouterr().err
