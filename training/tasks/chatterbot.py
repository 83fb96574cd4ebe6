"""Small real conversations from `chatterbot-corpus` (English): the offline stand-in for SmolTalk in the demo.

~2,000 short human-written dialogues (greetings, small talk, trivia, science, ...) read from the YAML
files that ship in the package. Each dialogue alternates user/assistant starting with the user; a
dialogue that ends on a user line loses that line. Files whose answers give the bot another identity
(`botprofile.yml`, `ai.yml`) are left out so they don't contradict the identity task.
Splits (deterministic): every 10th dialogue is `validation`, the rest `train`.
"""

from __future__ import annotations

from datasets import Dataset

from .common import TaskDataError, conversation_dataset, package_dir, to_schema_messages

SPLITS = ("train", "validation")
EXCLUDED = ("botprofile.yml", "ai.yml")


def dialogues() -> list[list[str]]:
    """Every English dialogue (a list of utterances), files in name order."""
    import yaml

    root = package_dir("chatterbot_corpus", "chatterbot-corpus==1.3.3") / "data" / "english"
    files = sorted(p for p in root.glob("*.yml") if p.name not in EXCLUDED)
    if not files:
        raise TaskDataError(f"chatterbot: no conversation files under {root}")
    out = []
    for path in files:
        for dialogue in yaml.safe_load(path.read_text(encoding="utf-8")).get("conversations") or []:
            lines = [str(x).strip() for x in dialogue if str(x).strip()]
            lines = lines[: len(lines) // 2 * 2]
            if lines:
                out.append(lines)
    return out


def load(split: str = "train") -> Dataset:
    """The dialogues of one split as conversations."""
    if split not in SPLITS:
        raise TaskDataError(f"chatterbot: unknown split {split!r}; choose one of {list(SPLITS)}")
    rows = []
    for i, lines in enumerate(dialogues()):
        if (i % 10 == 9) != (split == "validation"):
            continue
        messages = [{"role": "user" if j % 2 == 0 else "assistant", "content": text} for j, text in enumerate(lines)]
        rows.append({"messages": to_schema_messages(messages, f"chatterbot dialogue {i}")})
    return conversation_dataset(rows, where=f"chatterbot {split}")
