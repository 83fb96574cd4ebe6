"""The whole pipeline on a tiny model (the `ci` preset): every artifact exists and loads, reruns resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def speedrun(run_dir: Path, *args: str) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "app.cli", "speedrun", "--preset", "ci", "--run-dir", str(run_dir),
                           *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    return proc.stdout


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("speedrun") / "ci"
    speedrun(run)
    return run


def test_every_artifact_exists_and_loads(run_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in ("base", "sft"):
        model = AutoModelForCausalLM.from_pretrained(run_dir / name, trust_remote_code=True)
        assert model.config.model_type == "nanochat_hf" and model.config.num_hidden_layers == 2
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "tokenizer")
    assert tokenizer.convert_tokens_to_ids("<|assistant_end|>") == len(tokenizer) - 5
    assert len(list((run_dir / "data").glob("shard_*.parquet"))) == 3
    report = json.loads((run_dir / "report" / "report.json").read_text())
    assert report["base"]["core_eval"]["tasks"] and report["chat"]["tasks"]
    for plot in ("training.png", "core.png", "chatcore.png"):
        assert (run_dir / "report" / plot).stat().st_size > 5000, plot
    card = (run_dir / "hub" / "README.md").read_text()
    assert card.startswith("---") and "nanochat" in card and "model-index" in card
    assert (run_dir / "hub" / "model.safetensors").exists()
    summary = json.loads((run_dir / "speedrun.json").read_text())
    assert set(summary["timings_s"]) >= {"data", "tokenizer", "pretrain", "base_eval", "sft", "chat_eval", "report"}
    assert summary["final_model"].endswith("sft")


def test_rerun_skips_completed_stages(run_dir):
    out = speedrun(run_dir, "--stages", "data,tokenizer,pretrain,sft")
    assert out.count("skip:") == 4


def test_bad_stage_name(run_dir):
    proc = subprocess.run([sys.executable, "-m", "app.cli", "speedrun", "--preset", "ci", "--stages", "pretrian"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown stage(s) pretrian" in proc.stderr
