"""Shared test data for the chat-training tests: a small tokenizer, tiny base folders, Hub-schema fixtures
and a scripted model whose samples call the calculator (imported by conftest.py and the test modules)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

VOCAB_SIZE = 1024
SEQ_LEN = 256

GSM8K_ROWS = [
    {"question": "Tom has 3 bags with 4 apples each. He eats 2. How many apples are left?",
     "answer": "Tom has 3*4=<<3*4=12>>12 apples.\nAfter eating 2 he has 12-2=<<12-2=10>>10.\n#### 10"},
    {"question": "A pen costs $2 and a book costs $5. How much do 2 pens and 1 book cost?",
     "answer": "Two pens cost 2*2=<<2*2=4>>4 dollars.\nWith the book: 4+5=<<4+5=9>>9.\n#### 9"},
    {"question": "Sara reads 1,200 pages in 4 weeks. How many pages per week?",
     "answer": "She reads 1,200/4=<<1200/4=300>>300 pages a week.\n#### 300"},
]

SMOLTALK_ROWS = [
    {"messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Capital of France?"},
                  {"role": "assistant", "content": "Paris."}], "source": "fixture"},
    {"messages": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"},
                  {"role": "user", "content": "Tell me a joke."},
                  {"role": "assistant", "content": "Why did the tokenizer split? It needed some space."}],
     "source": "fixture"},
]


def corpus() -> list[str]:
    """Text the test tokenizer is trained on: the demo tasks' own conversations (so their words and the
    `#### n` answers are cheap to encode) plus the fixtures."""
    from training.tasks import load_task

    texts = []
    for name, kwargs in (("spelling_bee", {"size": 300}), ("simple_spelling", {"size": 300}), ("identity", {}),
                         ("chatterbot", {})):
        for row in load_task(name, "train", **kwargs):
            texts.append(" ".join(p["text"] for m in row["messages"] for p in m["content"]))
    texts += [r["question"] + " " + r["answer"] for r in GSM8K_ROWS] * 20
    texts += ["#### 7\n#### 6\n3+4 2+4 What is 3+4?\n"] * 200
    return texts


def tiny_base_config(tokenizer, **overrides):
    from helpers import tiny_config

    ids = {"bos_token_id": tokenizer.convert_tokens_to_ids("<|bos|>"),
           "eos_token_id": tokenizer.convert_tokens_to_ids("<|assistant_end|>")}
    kwargs = dict(vocab_size=len(tokenizer), max_position_embeddings=SEQ_LEN, short_window=32, pad_token_id=ids["bos_token_id"],
                  **ids)
    kwargs.update(overrides)
    return tiny_config(**kwargs)


def write_base(path: Path, tokenizer, *, seed: int = 0, randomize_weights: bool = True, summary: dict | None = None,
               model=None) -> Path:
    """A tiny NanoChat folder as `nanochat pretrain` writes it: model, tokenizer and summary.json."""
    from helpers import randomize

    from modeling_nanochat import NanoChatForCausalLM

    path = Path(path)
    if model is None:
        torch.manual_seed(seed)
        model = NanoChatForCausalLM(tiny_base_config(tokenizer))
        if randomize_weights:
            randomize(model, seed, scale=0.05)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    summary = summary or {"config": {"max_seq_len": SEQ_LEN, "device_batch_size": 2, "total_batch_size": 2 * SEQ_LEN,
                                     "embedding_lr": 0.3, "unembedding_lr": 0.008, "matrix_lr": 0.02}}
    (path / "summary.json").write_text(json.dumps(summary))
    return path


def scripted_model(tokenizer, script: dict[str, list[str]], hidden: int = 64):
    """A NanoChat that is a bigram model: the next token after `key` is one of `script[key]` (uniformly,
    p ~ 0.999 in total); any other token leads to `<|assistant_end|>`. Blocks are zeroed (identity), smear,
    value embeddings and backout are off, so the last hidden state is a multiple of the token's embedding;
    each key gets its own orthogonal embedding direction and lm_head rows point the way."""
    from modeling_nanochat import NanoChatForCausalLM

    def tid(text: str) -> int:
        special = tokenizer.convert_tokens_to_ids(text)
        if text.startswith("<|") and special is not None:
            return special
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert len(ids) == 1, f"{text!r} is not a single token: {ids}"
        return ids[0]

    config = tiny_base_config(tokenizer, hidden_size=hidden, num_attention_heads=2, num_key_value_heads=2,
                              use_smear=False, use_value_embeds=False, use_backout=False)
    torch.manual_seed(0)
    model = NanoChatForCausalLM(config)
    keys = list(script) + ["<|other|>"]
    assert len(keys) <= hidden
    with torch.no_grad():
        for p in model.model.layers.parameters():
            p.zero_()
        basis = torch.eye(hidden)
        model.model.embed_tokens.weight.copy_(basis[len(keys) - 1].expand_as(model.model.embed_tokens.weight))
        model.lm_head.weight.zero_()
        model.lm_head.weight[tid("<|assistant_end|>")] += 3.2 * basis[len(keys) - 1]
        for k, key in enumerate(script):
            model.model.embed_tokens.weight[tid(key)] = basis[k]
            for nxt in script[key]:
                model.lm_head.weight[tid(nxt)] += 3.2 * basis[k]
    return model.eval()


# the scripted "solver": "<|python_start|>3+4<|python_end|>" (or 2+4), the calculator's forced output,
# then "#### 7" (or 6)
TOOL_SCRIPT = {
    "<|assistant_start|>": ["<|python_start|>"],
    "<|python_start|>": ["3", "2"],
    "3": ["+"],
    "2": ["+"],
    "+": ["4"],
    "4": ["<|python_end|>"],
    "<|output_end|>": ["####"],
    "####": [" "],
    " ": ["7", "6"],
}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
