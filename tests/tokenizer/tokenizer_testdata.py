"""Shared test data for the tokenizer tests (imported by conftest.py and the test modules)."""

from __future__ import annotations

import random

VOCAB_SIZE = 1024

# Every script family the regex treats differently: letters with marks, CJK, Cyrillic, Hangul, digits in
# long runs, emoji with modifiers, contractions in both cases, CRLF, tabs and runs of spaces.
MULTILINGUAL = (
    "Hello wörld! Ünïcödé naïve café. 日本語のテキストです。中文文本。Привет, мир! Ελληνικά. "
    "안녕하세요 세계. مرحبا بالعالم. हिन्दी पाठ। 1234567890 3.14159 x²+y²=z² ∑∫√ 😀👍🏽🇫🇷 "
    "I'm, you're, he'll, they've, she'd; DON'T SHOUT'S. \r\n\ttabs\tand   spaces  \n\n\n  end\u00a0nbsp "
    "Zero\u200bwidth caf\u0065\u0301 (combining) ¡Hola! ¿Qué? — «quotes» “curly” ‘single’ … ok"
)


def synthetic_texts(n: int, seed: int = 0) -> list[str]:
    """Deterministic multilingual sentences made from MULTILINGUAL's words plus random numbers."""
    rng = random.Random(seed)
    words = MULTILINGUAL.split(" ")
    out = []
    for _ in range(n):
        parts = [rng.choice(words) if rng.random() < 0.85 else str(rng.randint(0, 10**rng.randint(1, 9))) for _ in
                 range(rng.randint(5, 60))]
        out.append(" ".join(parts) + rng.choice([".", "\n", "\n\n", "!", ""]))
    return out
