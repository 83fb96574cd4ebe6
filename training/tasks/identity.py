"""Identity conversations ("who are you?"), nanochat's CustomJSON task (spec §7.3-7.4).

The file format is the original's: JSONL, one conversation per line, each a JSON array of at least two
`{"role", "content"}` messages alternating user/assistant with string content (`{"messages": [...]}`
lines are accepted too). The original downloads a synthetic set in its speedrun; here
`identity_conversations()` generates a default set naming the model from templates (no download),
and `write_identity_jsonl()` writes it, so users can edit the file and point `--identity_file` at it.
Splits: the file is all training data (the original uses it twice in the SFT mixture).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from datasets import Dataset

from .common import TaskDataError, conversation_dataset, to_schema_messages

DEFAULT_SIZE = 500


def _facts(model_name: str, creator: str) -> list[tuple[list[str], list[str]]]:
    """(question variants, answer variants) about the model."""
    n = model_name
    return [
        (["Who are you?", "What are you?", "Hi! Who am I talking to?", "Tell me about yourself.",
          "what r u", "Introduce yourself, please."],
         [f"I'm {n}, a small chat assistant. I was trained from scratch with {creator}'s nanochat recipe: "
          "a tokenizer, pretraining on web text, then fine-tuning on conversations.",
          f"I am {n}, a compact language model built to chat. Everything about me, from the tokenizer to the "
          f"fine-tuning, was trained with the open-source nanochat pipeline by {creator}."]),
        (["What is your name?", "What should I call you?", "Do you have a name?", "Name?"],
         [f"My name is {n}.", f"You can call me {n}.", f"I'm called {n}."]),
        (["Who made you?", "Who created you?", "Who built you?", "Which company trained you?"],
         [f"I was built with nanochat, an open-source project by {creator} that trains a small ChatGPT-like "
          "model end to end on a modest budget.",
          f"{creator}'s nanochat recipe created me; whoever ran the training pipeline trained this copy of me."]),
        (["Are you ChatGPT?", "Are you GPT-4?", "Are you made by OpenAI?", "Are you Claude?"],
         [f"No, I'm {n}. I'm a much smaller model trained with the nanochat recipe, not a product of another "
          "company.",
          f"No. I'm {n}, a small open model trained with nanochat; I'm not ChatGPT, GPT-4 or any other assistant."]),
        (["How big are you?", "How many parameters do you have?", "Are you a large model?"],
         [f"I'm small as language models go: {n} models range from tens of millions to a couple of billion "
          "parameters, so I make more mistakes than large assistants.",
          "Quite small. My size depends on the depth I was trained at, but I'm far smaller than the big "
          "commercial models, so please double-check what I say."]),
        (["Can you do math?", "Are you good at arithmetic?", "Can you use a calculator?"],
         ["I can use a small Python calculator tool for arithmetic, which helps me avoid mistakes on "
          "calculations. For longer reasoning I can still get things wrong.",
          "Yes, within limits: I can call a calculator for arithmetic and counting letters, and I show my work."]),
        (["What languages do you speak?", "Do you speak French?", "Can you speak other languages?"],
         ["I work best in English, since most of my training data was English. I may understand a little of "
          "other languages, but my answers there are less reliable.",
          "Mostly English. I can try other languages, but expect more mistakes."]),
        (["Are you open source?", "Can I train my own version of you?", "Where does your code come from?"],
         [f"Yes. {n} is trained with open-source code: you can run the whole pipeline yourself, from the "
          "tokenizer to chat fine-tuning, and load the result with Hugging Face transformers.",
          "Yes, the code that trained me is open source, and a single command runs the whole pipeline."]),
        (["Do you have feelings?", "Are you conscious?", "Are you alive?"],
         [f"No. I'm {n}, a language model: I predict text one token at a time. I don't have feelings or "
          "experiences.",
          "No, I'm a statistical model of text. I can talk about feelings, but I don't have any."]),
        (["Can you browse the internet?", "Do you know today's news?", "What's your knowledge cutoff?"],
         ["I can't browse the internet. I only know what was in my training data, which stops at the date "
          "it was collected.",
          "No internet access, sorry. My knowledge is limited to my training data."]),
    ]


GREETINGS = ["Hello!", "Hi there!", "Hey.", "Good morning!", "hi"]
GREETING_REPLIES = ["Hello! How can I help you today?", "Hi! What can I do for you?", "Hey! What's on your mind?"]
THANKS = ["Thanks!", "Cool, thank you.", "Got it, thanks.", "Nice."]
THANKS_REPLIES = ["You're welcome!", "Happy to help.", "Anytime! Let me know if you have other questions."]


def identity_conversations(model_name: str = "nanochat", creator: str = "Andrej Karpathy", n: int = DEFAULT_SIZE,
                           seed: int = 0) -> list[list[dict[str, str]]]:
    """`n` deterministic conversations (1-3 identity questions, optional greeting and thanks) naming the model."""
    if n <= 0:
        raise ValueError(f"identity_conversations: n must be positive, got {n}")
    facts = _facts(model_name, creator)
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        turns: list[tuple[str, str]] = []
        if rng.random() < 0.3:
            turns.append((rng.choice(GREETINGS), rng.choice(GREETING_REPLIES)))
        for questions, answers in rng.sample(facts, rng.randint(1, 3)):
            turns.append((rng.choice(questions), rng.choice(answers)))
        if rng.random() < 0.3:
            turns.append((rng.choice(THANKS), rng.choice(THANKS_REPLIES)))
        out.append([m for q, a in turns for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})])
    return out


def write_identity_jsonl(path: str | Path, model_name: str = "nanochat", creator: str = "Andrej Karpathy",
                         n: int = DEFAULT_SIZE, seed: int = 0) -> Path:
    """Write `identity_conversations(...)` as the original's JSONL format; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for conversation in identity_conversations(model_name, creator, n, seed):
            f.write(json.dumps(conversation, ensure_ascii=False) + "\n")
    return path


def read_identity_jsonl(path: str | Path) -> list[list[dict]]:
    """Parse and validate the JSONL file; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise TaskDataError(f"identity file {path} does not exist (write one with "
                            "training.tasks.identity.write_identity_jsonl or omit it for the default set)")
    conversations = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TaskDataError(f"{where}: not valid JSON ({exc})") from None
            messages = obj.get("messages") if isinstance(obj, dict) else obj
            if not isinstance(messages, list) or len(messages) < 2:
                raise TaskDataError(f"{where}: expected a JSON array of at least 2 messages, got {line.strip()[:120]!r}")
            for j, m in enumerate(messages):
                if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                    raise TaskDataError(f"{where}: message {j} must be {{'role', 'content': str}}, got {m!r:.120}")
                expected = "user" if j % 2 == 0 else "assistant"
                if m.get("role") != expected:
                    raise TaskDataError(f"{where}: message {j} has role {m.get('role')!r}, expected {expected!r} "
                                        "(roles alternate user/assistant, starting with user)")
            conversations.append(messages)
    if not conversations:
        raise TaskDataError(f"identity file {path} has no conversations")
    return conversations


def load(split: str = "train", path: str | Path | None = None, model_name: str = "nanochat",
         creator: str = "Andrej Karpathy", n: int = DEFAULT_SIZE) -> Dataset:
    """Identity conversations from `path` (JSONL) or, without a path, the generated default set."""
    if split != "train":
        raise TaskDataError(f"identity: only a 'train' split exists, got {split!r}")
    where = f"identity ({path})" if path else "identity (generated)"
    conversations = read_identity_jsonl(path) if path else identity_conversations(model_name, creator, n)
    rows = [{"messages": to_schema_messages(c, f"{where} conversation {i}")} for i, c in enumerate(conversations)]
    return conversation_dataset(rows, where=where)

