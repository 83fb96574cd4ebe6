"""Shared data for the eval tests: a byte-level nanochat tokenizer, a tiny model on it, a tiny CORE bundle."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch

BOS, ASSISTANT_END = 256, 260  # the byte tokenizer's <|bos|> and <|assistant_end|> (specials sit on top of 256 bytes)


def byte_tokenizer():
    """Our HF tokenizer with only the 256 byte tokens (id = byte value) + the 9 specials at 256..264."""
    from modeling_nanochat.tokenization_nanochat import tokenizer_from_ranks

    return tokenizer_from_ranks({bytes([b]): b for b in range(256)})


def byte_model(seed: int = 0, **overrides):
    """A randomized 4-layer NanoChat over the byte tokenizer's 265 ids, in eval mode."""
    from helpers import randomize, tiny_config

    from modeling_nanochat import NanoChatForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(vocab_size=265, bos_token_id=BOS, eos_token_id=ASSISTANT_END, pad_token_id=BOS,
                         max_position_embeddings=256, **overrides)
    return randomize(NanoChatForCausalLM(config), seed).eval()


def save_model_folder(folder: Path, seed: int = 0) -> Path:
    """A `save_pretrained` folder (model + tokenizer) that `nanochat eval` and lm-eval can load."""
    byte_model(seed).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


MC_ITEMS = [
    {"query": "Sky is", "choices": ["blue", "green", "bright red"], "gold": 0},
    {"query": "Grass is", "choices": ["green", "purple"], "gold": 0},
    {"query": "Snow is", "choices": ["cold", "hot", "warm"], "gold": 2},
    {"query": "Fire is", "choices": ["hot", "wet"], "gold": 1},
]
SCHEMA_ITEMS = [
    {"context_options": ["The cup fell, so Tom", "The cup fell, so Ann"], "continuation": "cleaned it up.", "gold": 1},
    {"context_options": ["It rained and the dog", "It rained and the cat"], "continuation": "got wet.", "gold": 0},
    {"context_options": ["A bird can", "A fish can"], "continuation": "fly high.", "gold": 0},
]
LM_ITEMS = [
    {"context": "one two three", "continuation": "four"},
    {"context": "a b c d", "continuation": "e f"},
    {"context": "hello   ", "continuation": "world"},
]

# label -> (uri, type, shots, delimiter, random baseline %, items)
TINY_TASKS = {
    "tiny_mc": ("mc/tiny_mc.jsonl", "multiple_choice", 1, ": ", 40.0, MC_ITEMS),
    "tiny_schema": ("schema/tiny_schema.jsonl", "schema", 0, " ", 50.0, SCHEMA_ITEMS),
    "tiny_lm": ("lm/tiny_lm.jsonl", "language_modeling", 1, " ", 0.0, LM_ITEMS),
}


def write_bundle(root: Path, tasks: dict = TINY_TASKS) -> Path:
    """A CORE bundle in the original's layout (core.yaml, eval_data/, eval_meta_data.csv)."""
    import yaml

    root.mkdir(parents=True, exist_ok=True)
    icl = []
    for label, (uri, kind, shots, delim, _, items) in tasks.items():
        path = root / "eval_data" / uri
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(item) + "\n" for item in items))
        icl.append({"label": label, "dataset_uri": uri, "num_fewshot": [shots], "icl_task_type": kind,
                    "continuation_delimiter": delim})
    (root / "core.yaml").write_text(yaml.safe_dump({"icl_tasks": icl}))
    with open(root / "eval_meta_data.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Eval Task", "Task Category", "Random baseline"])
        for label, (_, _, _, _, rb, _) in tasks.items():
            writer.writerow([label, "test", rb])
    return root
