"""Pretraining: a real run on the embedded corpus, exact resume after SIGKILL, 2-process DDP and FSDP2, FP8 on CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training import pretrain as P

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Embedded corpus shards + a 1024-id tokenizer trained on part of them (a few seconds)."""
    from modeling_nanochat.tokenization_nanochat import train_tokenizer
    from training.data import iter_texts, prepare_embedded_corpus

    root = tmp_path_factory.mktemp("pretrain")
    prepare_embedded_corpus(root / "data", num_shards=3)
    tokenizer = train_tokenizer(iter_texts(str(root / "data"), "train", max_chars=400_000), vocab_size=1024)
    tokenizer.save_pretrained(root / "tok")
    return root


def base_args(corpus: Path, out: Path, *extra: str) -> list[str]:
    return ["--data", str(corpus / "data"), "--tokenizer", str(corpus / "tok"), "--output-dir", str(out),
            "--depth", "2", "--head-dim", "32", "--aspect-ratio", "32", "--max-seq-len", "64",
            "--device-batch-size", "4", "--total-batch-size", "512", "--eval-tokens", "512",
            "--sample-every", "-1", "--log-every", "1000", "--warmup-steps", "2", "--core-metric-every", "-1", *extra]


def launch(args: list[str], *, processes: int = 1, wait: bool = True, log: Path | None = None,
           fsdp_config: str | None = None, gpu: bool = False):
    """`python -m training.pretrain`, or `accelerate launch` with `processes` CPU processes (gloo).

    `fsdp_config`: an accelerate_configs/ file; on the CPU launched through tests/training/fsdp_on_cpu.py,
    which lets Accelerate's FSDP2 path run on CPU processes (Accelerate only enables it on
    accelerators); with `gpu`, a plain `accelerate launch` of it on the GPUs.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    env |= {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    if fsdp_config is not None and gpu:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / fsdp_config),
               "--num_processes", str(processes), "--main_process_port", "29535", "-m", "training.pretrain", *args]
    elif fsdp_config is not None:
        env |= {"ACCELERATE_USE_CPU": "1", "PYTHONPATH": os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])}
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / fsdp_config),
               "--num_processes", str(processes), "--main_process_port", "29534",
               str(REPO / "tests/training/fsdp_on_cpu.py"), "training.pretrain", *args]
    elif processes == 1:
        cmd = [sys.executable, "-m", "training.pretrain", *args]
    else:
        env["ACCELERATE_USE_CPU"] = "1"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               "29533", "-m", "training.pretrain", *args]
    out = open(log, "w") if log else subprocess.PIPE
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    if not wait:
        return proc
    stdout, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, (stdout or Path(log).read_text())[-4000:]
    return proc


def history(out: Path) -> list[dict]:
    return json.loads((out / "summary.json").read_text())["history"]


def test_run_lowers_val_bpb_and_saves_hf_folder(corpus, tmp_path):
    out = tmp_path / "run"
    launch(base_args(corpus, out, "--num-iterations", "24", "--eval-every", "12", "--matrix-lr", "0.1",
                     "--embedding-lr", "2.0", "--unembedding-lr", "0.1"))
    evals = [h["val_bpb"] for h in history(out) if "val_bpb" in h]
    assert len(evals) == 3 and evals[-1] < evals[0] - 0.3, evals
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.num_hidden_layers == 2 and len(tokenizer) == model.config.vocab_size == 1024
    assert [p.name for p in P.complete_checkpoints(out / "checkpoints")] == ["step-000024"]


def test_resume_after_sigkill_is_bitwise_identical(corpus, tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    common = ("--num-iterations", "40", "--eval-every", "20", "--save-every", "8", "--keep-last", "2")
    launch(base_args(corpus, full, *common))
    proc = launch(base_args(corpus, killed, *common), wait=False, log=tmp_path / "killed.log")
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "step-000016" / P.CHECKPOINT_MARKER).exists():
        assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "summary.json").exists(), "the run finished before it could be killed"
    launch(base_args(corpus, killed, *common, "--resume", "latest"))
    strip = lambda hist: [{k: v for k, v in h.items() if k != "dt"} for h in hist]  # noqa: E731 (timings differ)
    h_full, h_resumed = strip(history(full)), strip(history(killed))
    assert len(h_full) == 40 + 3
    assert h_resumed == h_full  # losses, lr multipliers and val bpb, bitwise (floats compared exactly)
    a, b = load_file(full / "model.safetensors"), load_file(killed / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    kept = [p.name for p in P.complete_checkpoints(killed / "checkpoints")]
    assert kept == ["step-000032", "step-000040"]  # keep-last 2, old ones pruned after new ones completed
    assert not list((killed / "checkpoints").glob("*.tmp"))


@pytest.fixture(scope="module")
def single_process_run(corpus, tmp_path_factory):
    """The 1-process reference for the 2-process runs: same global batch through 2 accumulation steps."""
    out = tmp_path_factory.mktemp("single") / "run"
    launch(base_args(corpus, out, *DISTRIBUTED_ARGS))
    return out


# 6 steps, val bpb at 0/3/6, CORE at the end (subset, 11 items per task: 10-shot needs 11), a checkpoint at step 3.
# Replicated packing: every rank packs the same global batch and keeps its rows, so the data does
# not depend on the number of processes.
DISTRIBUTED_ARGS = ("--num-iterations", "6", "--eval-every", "3", "--data-sharding", "replicated", "--save-every", "3",
                    "--core-metric-every", "6", "--core-metric-max-per-task", "11", "--core-bundle", "subset")


def test_two_process_ddp_matches_single_process(corpus, single_process_run, tmp_path):
    # Same global batch: 1 process x 2 accumulation steps == 2 processes x 1 step (replicated packing).
    single, double = single_process_run, tmp_path / "double"
    launch(base_args(corpus, double, *DISTRIBUTED_ARGS), processes=2)
    h1, h2 = history(single), history(double)
    assert [h["step"] for h in h1] == [h["step"] for h in h2]
    # CORE's items were split across the 2 ranks and the results all-reduced: the same scores
    core1, core2 = ([h["core_metric"] for h in hist if "core_metric" in h] for hist in (h1, h2))
    assert len(core1) == 1 and core2 == pytest.approx(core1, abs=1e-9)
    # (the logged train loss is the last micro-step's on rank 0, as the original: different rows here)
    bpb1, bpb2 = [h["val_bpb"] for h in h1 if "val_bpb" in h], [h["val_bpb"] for h in h2 if "val_bpb" in h]
    assert len(bpb1) == 3 and bpb1[-1] < bpb1[0]
    assert bpb2 == pytest.approx(bpb1, rel=1e-5)
    a, b = load_file(single / "model.safetensors"), load_file(double / "model.safetensors")
    for k in a:  # tolerance: gloo all-reduce sums in another order than one process's accumulation
        torch.testing.assert_close(b[k], a[k], atol=2e-5, rtol=1e-4, msg=k)


def test_two_process_fsdp2_matches_single_process_and_resumes_bitwise(corpus, single_process_run, tmp_path):
    """Accelerate's FSDP2 (row-sharded DTensor parameters; MuonAdamW exchanging rows by all-to-all)
    == 1 process; its sharded checkpoint (torch.distributed.checkpoint) resumes bitwise."""
    single, fsdp, resumed = single_process_run, tmp_path / "fsdp", tmp_path / "resumed"
    launch(base_args(corpus, fsdp, *DISTRIBUTED_ARGS), processes=2, fsdp_config="accelerate_configs/cpu_2proc_fsdp.yaml")
    summary = json.loads((fsdp / "summary.json").read_text())
    assert (summary["distributed_type"], summary["processes"]) == ("FSDP", 2)
    # saved with the model's own class, not FSDP2's generated subclass (auto_map, code files)
    assert json.loads((fsdp / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"] == \
        "modeling_nanochat.NanoChatForCausalLM"
    assert not list(fsdp.glob("_fsdp*.py")) and (fsdp / "modeling_nanochat.py").is_file()
    step3 = fsdp / "checkpoints" / "step-000003"
    assert (step3 / "pytorch_model_fsdp_0").is_dir() and (step3 / "optimizer_0").is_dir()  # sharded (DCP) state
    h1, h2 = history(single), history(fsdp)
    bpb1, bpb2 = [h["val_bpb"] for h in h1 if "val_bpb" in h], [h["val_bpb"] for h in h2 if "val_bpb" in h]
    assert len(bpb1) == 3 and bpb2 == pytest.approx(bpb1, rel=1e-5)
    core1, core2 = ([h["core_metric"] for h in hist if "core_metric" in h] for hist in (h1, h2))
    assert len(core2) == 1 and core2 == pytest.approx(core1, abs=1e-9)  # every rank scored every item in lockstep
    a, b = load_file(single / "model.safetensors"), load_file(fsdp / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:  # the final save gathered the shards into whole tensors
        torch.testing.assert_close(b[k], a[k], atol=2e-5, rtol=1e-4, msg=k)

    # the sharded optimizer state, gathered for SFT (training.sft loads a base run's momenta), == 1 process's
    from training.sft import latest_optimizer_state, load_optimizer_state

    path1, path2 = latest_optimizer_state(single), latest_optimizer_state(fsdp)
    assert path1.name == "optimizer.bin" and path2.name == "optimizer_0"
    o1, o2 = load_optimizer_state(path1), load_optimizer_state(path2)
    assert [g["name"] for g in o2["param_groups"]] == [g["name"] for g in o1["param_groups"]]
    assert [g["params"] for g in o2["param_groups"]] == [g["params"] for g in o1["param_groups"]]
    assert o2["state"].keys() == o1["state"].keys()
    for index, entry in o1["state"].items():
        for key, value in entry.items():
            torch.testing.assert_close(o2["state"][index][key], value, atol=2e-5, rtol=1e-4, msg=f"{index} {key}")

    launch(base_args(corpus, resumed, *DISTRIBUTED_ARGS, "--resume", str(step3)), processes=2,
           fsdp_config="accelerate_configs/cpu_2proc_fsdp.yaml")
    strip = lambda hist: [{k: v for k, v in h.items() if k != "dt"} for h in hist]  # noqa: E731 (timings differ)
    assert strip(history(resumed)) == strip(h2)  # each rank got back its own data position and batch
    c = load_file(resumed / "model.safetensors")
    assert all(torch.equal(b[k], c[k]) for k in b)


def test_resume_needs_the_same_number_of_processes():
    state = P.PerRankState(P.LoopState(step=7), "loop state")
    saved = state.state_dict()
    assert saved["world_size"] == 1 and saved["ranks"][0]["step"] == 7
    other = P.LoopState()
    P.PerRankState(other, "loop state").load_state_dict(saved)
    assert other.step == 7
    P.PerRankState(other, "loop state").load_state_dict({**saved["ranks"][0], "step": 9})  # older, unwrapped format
    assert other.step == 9
    with pytest.raises(ValueError, match="written by 2 process.*this run has 1"):
        P.PerRankState(other, "loop state").load_state_dict({"world_size": 2, "ranks": [saved["ranks"][0]] * 2})


def test_fsdp_setup_errors():
    from types import SimpleNamespace

    def accelerator(version, wrap):
        plugin = SimpleNamespace(fsdp_version=version, transformer_cls_names_to_wrap=wrap)
        return SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin))

    fp32 = torch.nn.Sequential(torch.nn.Embedding(4, 2), torch.nn.Linear(2, 2))
    mixed = torch.nn.Sequential(torch.nn.Embedding(4, 2).to(torch.bfloat16), torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="fsdp_version: 2"):
        P.check_fsdp_wrapping(accelerator(1, ["NanoChatDecoderLayer"]), fp32)
    with pytest.raises(ValueError, match="add Embedding to fsdp_transformer_layer_cls_to_wrap"):
        P.check_fsdp_wrapping(accelerator(2, ["NanoChatDecoderLayer"]), mixed)
    P.check_fsdp_wrapping(accelerator(2, ["NanoChatDecoderLayer"]), fp32)
    P.check_fsdp_wrapping(accelerator(2, ["NanoChatDecoderLayer", "Embedding"]), mixed)


def test_fp8_filter_and_eval_swap():
    pytest.importorskip("torchao")
    from torchao.float8 import convert_to_float8_training
    from torchao.float8.float8_linear import Float8Linear

    from modeling_nanochat import NanoChatConfig, NanoChatForCausalLM

    torch.manual_seed(0)
    # the smallest shapes the filter converts (min dim 128): FP8 matmuls are emulated, slowly, on the CPU
    model = NanoChatForCausalLM(NanoChatConfig.from_depth(2, head_dim=64, aspect_ratio=64, vocab_size=256))
    ids = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        reference = model(ids).logits
    convert_to_float8_training(model, module_filter_fn=P.fp8_module_filter)
    converted = {n for n, m in model.named_modules() if isinstance(m, Float8Linear)}
    assert "model.layers.0.self_attn.q_proj" in converted and "model.layers.1.mlp.fc1" in converted
    assert "lm_head" in converted
    assert "model.smear_gate" not in converted and "model.layers.1.self_attn.ve_gate" not in converted
    loss = model(ids, labels=ids).loss  # FP8 forward/backward runs on the CPU
    loss.backward()
    assert torch.isfinite(loss)
    with P.fp8_disabled(model), torch.no_grad():
        assert not any(isinstance(m, Float8Linear) for m in model.modules())
        torch.testing.assert_close(model(ids).logits, reference, atol=1e-5, rtol=0)  # exact compute dtype again
    assert any(isinstance(m, Float8Linear) for m in model.modules())  # restored afterwards


@pytest.mark.parametrize("topology", ["1 process", "FSDP2 x 2"])
def test_fp8_run_on_cpu(corpus, tmp_path, topology):
    pytest.importorskip("torchao")
    out = tmp_path / "fp8"
    fsdp = topology.startswith("FSDP")
    launch(base_args(corpus, out, "--num-iterations", "2", "--eval-every", "-1", "--fp8", "true", "--depth", "2",
                     "--aspect-ratio", "64", "--head-dim", "64", "--max-seq-len", "16", "--device-batch-size", "1",
                     "--total-batch-size", "32" if fsdp else "16", "--eval-tokens", "16"),
           processes=2 if fsdp else 1, fsdp_config="accelerate_configs/cpu_2proc_fsdp.yaml" if fsdp else None)
    # the final evaluation ran with the Float8Linear modules acting as plain Linears (under FSDP too)
    assert all(0 < h["val_bpb"] < 20 for h in history(out) if "val_bpb" in h)
    assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in history(out) if "train_loss" in h)
    weights = load_file(out / "model.safetensors")
    assert "model.layers.0.self_attn.q_proj.weight" in weights  # saved as a plain model


def test_bad_inputs_fail_before_training(corpus, tmp_path):
    with pytest.raises(ValueError, match="no tokenizer at"):
        P.run(P.parse_config(base_args(corpus, tmp_path / "x", "--tokenizer", str(tmp_path / "none"))))
    with pytest.raises(ValueError, match="--data-sharding must be one of"):
        P.parse_config(base_args(corpus, tmp_path / "x", "--data-sharding", "weird"))
    proc = subprocess.run([sys.executable, "-m", "training.pretrain", *base_args(corpus, tmp_path / "y", "--data",
                           str(tmp_path / "nodata"))], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_peak_flops_table():
    assert P.peak_flops(torch.device("cpu")) == float("inf")


@pytest.mark.parametrize("tracker", ["mlflow", "wandb"])
def test_trackers_log_locally(corpus, tmp_path, tracker, monkeypatch):
    pytest.importorskip(tracker)
    out = tmp_path / tracker
    launch(base_args(corpus, out, "--num-iterations", "2", "--eval-every", "1", "--report-to", tracker))
    if tracker == "mlflow":
        import mlflow

        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # reading the run's local file store

        client = mlflow.MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        assert len(runs) == 1
        bpb = [m.value for m in client.get_metric_history(runs[0].info.run_id, "val/bpb")]
        assert len(bpb) == 3 and bpb == [h["val_bpb"] for h in history(out) if "val_bpb" in h]
        assert "train/loss" in runs[0].data.metrics
    else:  # offline run folder with the history inside, ready for `wandb sync`
        runs = list((out / "wandb").glob("offline-run-*"))
        assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))


def test_core_metric_during_training(corpus, tmp_path):
    out = tmp_path / "core"
    launch(base_args(corpus, out, "--num-iterations", "2", "--eval-every", "-1", "--core-metric-every", "1",
                     "--core-metric-max-per-task", "11", "--core-bundle", "subset"))
    cores = [h for h in history(out) if "core_metric" in h]
    assert [h["step"] for h in cores] == [1, 2]  # every step after 0, and the last
    assert len(cores[-1]["centered_results"]) == 14 and -1 <= cores[-1]["core_metric"] <= 1


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["ao", "te"])
def test_gpu_fp8_run(corpus, tmp_path, backend):
    if backend == "te":
        pytest.importorskip("transformer_engine", reason="Transformer Engine is not installed (pip install -e .[gpu])")
    out = tmp_path / backend
    launch(base_args(corpus, out, "--num-iterations", "4", "--eval-every", "2", "--fp8", "true", "--fp8-backend",
                     backend, "--aspect-ratio", "64", "--head-dim", "64", "--max-seq-len", "128",
                     "--device-batch-size", "4", "--total-batch-size", "512"))
    evals = [h["val_bpb"] for h in history(out) if "val_bpb" in h]
    assert len(evals) == 3 and all(0 < b < 20 for b in evals)


@pytest.mark.gpu
def test_gpu_run_compiles_with_bf16_embeddings(corpus, tmp_path):
    out = tmp_path / "gpu"
    launch(base_args(corpus, out, "--num-iterations", "6", "--eval-every", "3", "--compile", "yes"))
    evals = [h["val_bpb"] for h in history(out) if "val_bpb" in h]
    assert evals[-1] < evals[0]
    weights = load_file(out / "model.safetensors")
    assert weights["model.embed_tokens.weight"].dtype == torch.bfloat16  # nanochat's dtype policy on CUDA


@pytest.mark.gpu
def test_gpu_fsdp2_run_with_bf16_embeddings(corpus, tmp_path):
    """accelerate_configs/gpu_8_fsdp.yaml on the GPUs there are (up to 2): bf16 embeddings as their own
    FSDP units, compiled model, sharded checkpoint, gathered HF save."""
    processes = min(2, torch.cuda.device_count())
    out = tmp_path / "fsdp"
    launch(base_args(corpus, out, "--num-iterations", "6", "--eval-every", "3", "--save-every", "3", "--compile", "yes"),
           processes=processes, fsdp_config="accelerate_configs/gpu_8_fsdp.yaml", gpu=True)
    evals = [h["val_bpb"] for h in history(out) if "val_bpb" in h]
    assert len(evals) == 3 and evals[-1] < evals[0]
    assert (out / "checkpoints" / "step-000003" / "pytorch_model_fsdp_0").is_dir()
    weights = load_file(out / "model.safetensors")
    assert weights["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert weights["model.layers.0.mlp.fc1.weight"].dtype == torch.float32
