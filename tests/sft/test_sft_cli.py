"""`nanochat sft` and `nanochat rl` on a tiny base model from `nanochat pretrain` (offline demo data)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from app import cli

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, tokenizer):
    """`python -m training.pretrain` for 4 steps on the embedded corpus with the test tokenizer (~10 s)."""
    from training.data import prepare_embedded_corpus

    root = tmp_path_factory.mktemp("pipeline")
    prepare_embedded_corpus(root / "data", num_shards=3)
    tokenizer.save_pretrained(root / "tok")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    cmd = [sys.executable, "-m", "training.pretrain", "--data", str(root / "data"), "--tokenizer", str(root / "tok"),
           "--output-dir", str(root / "base"), "--depth", "2", "--head-dim", "32", "--aspect-ratio", "32",
           "--max-seq-len", "256", "--device-batch-size", "2", "--total-batch-size", "512", "--num-iterations", "4",
           "--eval-tokens", "512", "--sample-every", "-1", "--log-every", "1000", "--warmup-steps", "1",
           "--core-metric-every", "-1"]
    proc = subprocess.run(cmd, cwd=REPO, env=env | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root


def test_nanochat_sft_then_rl_on_a_pretrained_base(pretrained):
    from transformers import AutoModelForCausalLM

    base, sft_dir, rl_dir = pretrained / "base", pretrained / "sft", pretrained / "rl"
    assert cli.main(["sft", "--base", str(base), "--output_dir", str(sft_dir), "--mixture", "demo",
                     "--max_conversations", "48", "--max_steps", "3", "--eval_strategy", "no", "--use_cpu", "true",
                     "--disable_tqdm", "true", "--chatcore_every", "-1"]) == 0
    summary = json.loads((sft_dir / "summary.json").read_text())
    assert summary["steps"] == 3
    assert summary["settings"]["optimizer_state"].endswith("step-000004/optimizer.bin")  # the base run's momenta
    assert summary["settings"]["max_seq_len"] == 256 and summary["settings"]["embedding_lr"] == 0.3  # inherited
    assert AutoModelForCausalLM.from_pretrained(sft_dir).config.model_type == "nanochat_hf"

    assert cli.main(["rl", "--model", str(sft_dir), "--output_dir", str(rl_dir), "--task", "spelling_bee",
                     "--task_size", "4", "--num_generations", "2", "--per_device_train_batch_size", "2",
                     "--gradient_accumulation_steps", "1", "--max_steps", "1", "--max_completion_length", "12",
                     "--use_cpu", "true", "--disable_tqdm", "true"]) == 0
    assert json.loads((rl_dir / "summary.json").read_text())["steps"] == 1
    assert (rl_dir / "model.safetensors").is_file() and (rl_dir / "tokenizer.json").is_file()


def launch_sft(base: Path, out: Path, *extra: str, fsdp: bool = False) -> dict:
    """`training.sft` in 2 CPU processes (gloo) through `accelerate launch`: DDP, or FSDP2 through
    tests/training/fsdp_on_cpu.py (Accelerate enables FSDP only on accelerators)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    env |= {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", "29536"]
    if fsdp:
        launcher += ["--config_file", str(REPO / "accelerate_configs/cpu_2proc_fsdp.yaml"),
                     str(REPO / "tests/training/fsdp_on_cpu.py"), "training.sft"]
    else:
        launcher += ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                     "--dynamo_backend", "no", "-m", "training.sft"]
    cmd = [*launcher, "--base", str(base), "--output_dir", str(out), "--mixture", "demo", "--max_conversations", "48",
           "--max_steps", "2", "--device_batch_size", "1", "--eval_strategy", "no", "--use_cpu", "true",
           "--disable_tqdm", "true", *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads((out / "summary.json").read_text())


def test_two_process_sft_with_chatcore_then_fsdp2_matches(pretrained, tmp_path):
    """`accelerate launch` with 2 CPU processes (gloo): SFT with ChatCORE during training, whose problems are
    split across the ranks and all-reduced; the logged accuracies equal one process evaluating the saved model.
    Then the same SFT under FSDP2, whose weights must equal the DDP run's."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eval.chat import LocalChat, evaluate_chatcore

    out = tmp_path / "sft2"
    tasks = "ARC-Easy|SpellingBee"
    summary = launch_sft(pretrained / "base", out, "--chatcore_every", "2", "--chatcore_max_problems", "6",
                         "--chatcore_tasks", tasks, "--chatcore_max_new_tokens", "8")
    assert (summary["distributed_type"], summary["processes"]) == ("MULTI_CPU", 2)
    logged = [h for h in summary["history"] if "chatcore/ARC-Easy" in h]
    assert [h["step"] for h in logged] == [2]
    model = AutoModelForCausalLM.from_pretrained(out)
    single = evaluate_chatcore(LocalChat(model, AutoTokenizer.from_pretrained(out), 8), tasks.split("|"),
                               max_problems=6, max_new_tokens=8)
    for name, result in single["tasks"].items():
        assert logged[0][f"chatcore/{name}"] == pytest.approx(result["accuracy"], abs=1e-9), name

    # the same SFT under FSDP2 (row-sharded parameters, MuonAdamW's all-to-all) == DDP, same batches
    fsdp = tmp_path / "fsdp"
    summary = launch_sft(pretrained / "base", fsdp, "--chatcore_every", "-1", fsdp=True)
    assert (summary["distributed_type"], summary["processes"]) == ("FSDP", 2)
    assert summary["settings"]["optimizer_state"].endswith("optimizer.bin")  # the base run's momenta, sharded
    assert json.loads((fsdp / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"] == \
        "modeling_nanochat.NanoChatForCausalLM"
    a, b = load_file(out / "model.safetensors"), load_file(fsdp / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=2e-5, rtol=1e-4, msg=k)


def test_cli_lists_the_stages_and_reports_bad_flags(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "sft" in out and "rl" in out
    assert cli.main(["sft", "--mixture", "nope"]) == 2
    assert "--mixture must be one of nanochat, demo, got 'nope'" in capsys.readouterr().err
    assert cli.main(["rl", "--model", "/nonexistent"]) == 2
    assert "--model /nonexistent: no config.json" in capsys.readouterr().err


def test_demo_recipes_parse():
    from training import rl, sft

    cfg = sft.parse_config(["--config", str(REPO / "training/recipes/sft_demo.yaml")])
    assert cfg.mixture == "demo" and cfg.base == "runs/demo/base" and cfg.assistant_only_loss and cfg.packing
    cfg = rl.parse_config(["--config", str(REPO / "training/recipes/rl_demo.yaml"), "--max_steps", "3"])
    assert cfg.task == "spelling_bee" and cfg.num_generations == 8 and cfg.max_steps == 3 and cfg.beta == 0.0
