"""Arithmetic with the calculator tool: "What is 12 times 7?" -> a python call `12*7`, its output, the answer.

The original teaches tool use through GSM8K's `<<expr=result>>` annotations (Hub data); this generated task
gives the offline demo the same skill on simple products, sums and differences. The assistant writes the
expression as a `python` part, the tool's result arrives as a `python_output` part (forced by the engine at
inference, never a training target), and the final text repeats it after `#### ` (scored like GSM8K).
Splits: `train` and `test` (disjoint per-example seeds). Rows: `messages`, `answer`.
"""

from __future__ import annotations

import random

from datasets import Dataset, Features, Value

from .common import assistant, conversation_dataset, seeded_examples, user

DEFAULT_SIZE = 4_000
EXTRA = Features({"answer": Value("string")})

# (question template, python operator, word used in the answer)
OPERATIONS = (
    ("What is {a} times {b}?", "*", "times"),
    ("How much is {a} x {b}?", "*", "times"),
    ("Multiply {a} by {b}.", "*", "times"),
    ("Compute {a} * {b}.", "*", "times"),
    ("What is the product of {a} and {b}?", "*", "times"),
    ("What is {a} plus {b}?", "+", "plus"),
    ("Add {a} and {b}.", "+", "plus"),
    ("What is {a} minus {b}?", "-", "minus"),
)


def load(split: str = "train", size: int = DEFAULT_SIZE) -> Dataset:
    """`size` generated problems; products are two factors of 2-99, sums/differences of 1-999."""

    def make(rng: random.Random) -> dict:
        template, op, word = OPERATIONS[rng.randrange(len(OPERATIONS))]
        if op == "*":
            a, b = rng.randint(2, 99), rng.randint(2, 99)
        else:
            a, b = rng.randint(1, 999), rng.randint(1, 999)
        result = {"*": a * b, "+": a + b, "-": a - b}[op]
        parts = [
            {"type": "python", "text": f"{a}{op}{b}"},
            {"type": "python_output", "text": str(result)},
            {"type": "text", "text": f"{a} {word} {b} is {result}.\n\n#### {result}"},
        ]
        return {"messages": [user(template.format(a=a, b=b)), assistant(parts)], "answer": str(result)}

    return conversation_dataset(seeded_examples(size, split, "arithmetic", make), extra=EXTRA,
                                where=f"arithmetic {split}")
