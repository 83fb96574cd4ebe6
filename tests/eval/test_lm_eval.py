"""EleutherAI lm-evaluation-harness runs a saved folder (`--model hf ... trust_remote_code=True`) on a task
defined locally, and its log-likelihoods are exactly our model's."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from eval_testdata import byte_tokenizer, save_model_folder

DOCS = [
    {"question": "The sky is", "choices": ["blue", "green", "loud"], "label": 0},
    {"question": "Two plus two is", "choices": ["four", "five"], "label": 0},
    {"question": "Ice is", "choices": ["cold", "hot", "purple", "round"], "label": 0},
]
TASK = """task: nanochat_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
"""


@pytest.mark.skipif(shutil.which("lm_eval") is None and not (Path(sys.executable).parent / "lm_eval").exists(),
                    reason="lm-eval is not installed (pip install lm-eval: the dev extra)")
def test_lm_eval_harness_scores_a_saved_folder(tmp_path):
    folder = save_model_folder(tmp_path / "model")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tasks / "nanochat_local_mc.yaml").write_text(TASK.format(data=tasks / "docs.jsonl"))
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_DATASETS_CACHE": str(tmp_path / "hf_cache"), "OMP_NUM_THREADS": "1"}
    lm_eval = shutil.which("lm_eval") or str(Path(sys.executable).parent / "lm_eval")
    proc = subprocess.run(
        [lm_eval, "--model", "hf", "--model_args", f"pretrained={folder},trust_remote_code=True,add_bos_token=True",
         "--tasks", "nanochat_local_mc", "--include_path", str(tasks), "--device", "cpu", "--batch_size", "4",
         "--output_path", str(out), "--log_samples"],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    samples = [json.loads(line) for f in out.rglob("samples_nanochat_local_mc_*.jsonl") for line in f.open()]
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    assert len(samples) == len(DOCS) and "acc,none" in results["results"]["nanochat_local_mc"]

    # our own log-likelihoods: [BOS] + context bytes, then " " (lm-eval's target delimiter) + the choice's bytes
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    tokenizer = byte_tokenizer()
    correct = 0
    for sample in sorted(samples, key=lambda s: s["doc_id"]):
        doc = DOCS[sample["doc_id"]]
        ours = []
        for choice in doc["choices"]:
            context = tokenizer(doc["question"]).input_ids  # <|bos|> + bytes
            cont = tokenizer(" " + choice, add_special_tokens=False).input_ids
            with torch.no_grad():
                logp = model(torch.tensor([context + cont])).logits[0].log_softmax(-1)
            ours.append(sum(logp[len(context) + i - 1, t].item() for i, t in enumerate(cont)))
        theirs = [float(r[0][0]) for r in sample["resps"]]
        assert theirs == pytest.approx(ours, abs=1e-3)
        correct += int(max(range(len(ours)), key=ours.__getitem__) == doc["label"])
    assert results["results"]["nanochat_local_mc"]["acc,none"] == pytest.approx(correct / len(DOCS))
