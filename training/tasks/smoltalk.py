"""SmolTalk (`HuggingFaceTB/smol-smoltalk`): general chat, the bulk of nanochat's SFT mixture (spec §7.3).

Splits: train (~460K conversations, SFT) and test (~24K, validation loss). Hub only: nothing ships
offline, so `source` may point at a local copy with the Hub schema (`messages`: a list of
{role, content} with an optional leading system message, then alternating user/assistant strings).
"""

from __future__ import annotations

from datasets import Dataset

from .common import (
    SHUFFLE_SEED,
    check_split,
    convert,
    load_source,
    require_columns,
    to_schema_messages,
)

HUB_ID = "HuggingFaceTB/smol-smoltalk"
SPLITS = ("train", "test")


def load(split: str = "train", source: str | None = None) -> Dataset:
    """SmolTalk conversations in the dataset schema, shuffled with seed 42 like the original."""
    check_split(split, SPLITS, "smoltalk")
    source = source or HUB_ID
    where = f"smoltalk {split} ({source})"
    ds = load_source(source, split)
    require_columns(ds, ["messages"], where)

    def fn(row, i):
        return {"messages": to_schema_messages(row["messages"], f"{where} row {i}")}

    return convert(ds.shuffle(seed=SHUFFLE_SEED), fn, None, where)
