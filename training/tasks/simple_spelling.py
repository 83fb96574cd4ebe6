"""SimpleSpelling (spec §7.4): "Spell the word: apple" -> "apple:a,p,p,l,e". Generated, no download.

Splits: `train` and `test` differ only in their per-example seeds. Size 200,000 in the original mixture.
"""

from __future__ import annotations

import random

from datasets import Dataset

from .common import (
    assistant,
    conversation_dataset,
    deterministic_shuffle,
    english_words,
    seeded_examples,
    user,
)

DEFAULT_SIZE = 200_000
_SHUFFLED: list[str] | None = None


def spell(word: str) -> str:
    """The assistant's answer: `word:w,o,r,d`."""
    return f"{word}:{','.join(word)}"


def load(split: str = "train", size: int = DEFAULT_SIZE) -> Dataset:
    """`size` spelling conversations over the word list shuffled with random.Random(42)."""
    global _SHUFFLED
    if _SHUFFLED is None:
        _SHUFFLED = deterministic_shuffle(english_words(), 42)
    words = _SHUFFLED

    def make(rng: random.Random) -> dict:
        word = rng.choice(words)
        return {"messages": [user(f"Spell the word: {word}"), assistant(spell(word))]}

    return conversation_dataset(seeded_examples(size, split, "simple_spelling", make), where=f"simple_spelling {split}")
