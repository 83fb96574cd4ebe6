"""SpellingBee (spec §7.4): count a letter in a word, by hand and then with the calculator tool.

"How many r are in strawberry?" -> a manual spelling and count, then a python call
`'strawberry'.count('r')` whose output the tool supplies, then `#### 3` (scored like GSM8K). Generated
from the `english-words` list with per-example seeds; the RNG calls follow the original's order. The user
templates (51: English plus a few Spanish, Chinese, Korean, French, German and Japanese ones) and the
wording of the manual part are this project's own, in the original's structure.
Splits: `train` and `test` (disjoint seeds). Size 80,000 in the original mixture. Rows: `messages`,
`answer` (the count as a string).
"""

from __future__ import annotations

import random
import string

from datasets import Dataset, Features, Value

from .common import assistant, conversation_dataset, english_words, seeded_examples, user

DEFAULT_SIZE = 80_000
EXTRA = Features({"answer": Value("string")})

TEMPLATES = (
    # English (30)
    "How many {letter} are in the word {word}",
    "How many {letter} are there in {word}",
    "How many times does {letter} appear in {word}",
    "How many times does the letter {letter} occur in {word}",
    "Count the number of {letter} in {word}",
    "Count how many {letter} the word {word} has",
    "Count the {letter} in {word}",
    "What is the number of {letter} in {word}",
    "What's the count of {letter} in {word}",
    "How often does {letter} show up in {word}",
    "In the word {word}, how many {letter} are there",
    "In {word}, how many times does {letter} appear",
    "Tell me how many {letter} are in {word}",
    "Can you count the {letter} in {word}",
    "Could you tell me how many {letter} there are in {word}",
    "Please count the letter {letter} in the word {word}",
    "I need the number of {letter} in {word}",
    "Number of {letter} in {word}",
    "How many {letter} does {word} contain",
    "How many {letter} does the word {word} have",
    "Find the number of times {letter} appears in {word}",
    "Give me the count of the letter {letter} in {word}",
    "How many occurrences of {letter} are in {word}",
    "What is the frequency of {letter} in {word}",
    "Letter {letter} in {word}: how many",
    "Quick question: how many {letter} in {word}",
    "Do you know how many {letter} are in {word}",
    "Spell {word} and count the {letter}",
    "How many instances of the letter {letter} can you find in {word}",
    "Count every {letter} in the word {word}",
    # Spanish (4)
    "¿Cuántas {letter} hay en {word}",
    "Cuenta las {letter} en la palabra {word}",
    "¿Cuántas veces aparece la letra {letter} en {word}",
    "Dime cuántas {letter} tiene {word}",
    # Chinese (4)
    "{word}中有几个{letter}",
    "单词{word}里有多少个字母{letter}",
    "数一数{word}中{letter}出现了几次",
    "{letter}在{word}里出现了多少次",
    # Korean (4)
    "{word}에 {letter}가 몇 개 있나요",
    "{word}에서 {letter}는 몇 번 나오나요",
    "단어 {word}에 있는 {letter}의 개수를 세어 주세요",
    "{word}에 글자 {letter}가 몇 번 들어가나요",
    # French (3)
    "Combien de {letter} y a-t-il dans {word}",
    "Compte les {letter} dans le mot {word}",
    "Combien de fois la lettre {letter} apparaît-elle dans {word}",
    # German (3)
    "Wie viele {letter} sind in {word}",
    "Zähle die {letter} im Wort {word}",
    "Wie oft kommt der Buchstabe {letter} in {word} vor",
    # Japanese (3)
    "{word}に{letter}はいくつありますか",
    "{word}の中に{letter}は何回出てきますか",
    "単語{word}に含まれる{letter}の数を数えてください",
)
QUOTES = ("", "'", '"')


def conversation(rng: random.Random, words: list[str]) -> dict:
    """One example; the RNG calls happen in the original's order (word, letter, template, case, quotes, '?')."""
    word = rng.choice(words)
    letter = rng.choice(word) if rng.random() < 0.9 else rng.choice(string.ascii_lowercase)
    count = word.count(letter)
    template = rng.choice(TEMPLATES)
    if rng.random() < 0.3:
        template = template.lower()
    letter_quote, word_quote = rng.choice(QUOTES), rng.choice(QUOTES)
    question = template.format(letter=f"{letter_quote}{letter}{letter_quote}", word=f"{word_quote}{word}{word_quote}")
    if rng.random() < 0.5:
        question += "?"
    lines, running = [], 0
    for i, char in enumerate(word, 1):
        if char == letter:
            running += 1
            lines.append(f"{i}:{char} hit! count={running}")
        else:
            lines.append(f"{i}:{char}")
    manual = (f"I need to count the letter '{letter}' in the word '{word}'. Let me do it by hand first.\n\n"
              f"First spell the word out:\n{word}:{','.join(word)}\n\n"
              f"Then count the occurrences of '{letter}':\n" + "\n".join(lines) + f"\n\nThis gives us {running}.")
    parts = [
        {"type": "text", "text": manual},
        {"type": "text", "text": "\n\nLet me double check this using Python:\n\n"},
        {"type": "python", "text": f"'{word}'.count('{letter}')"},
        {"type": "python_output", "text": str(count)},
        {"type": "text", "text": f"\n\nPython gives us {count}.\n\nMy final answer is:\n\n#### {count}"},
    ]
    return {"messages": [user(question), assistant(parts)], "answer": str(count)}


def load(split: str = "train", size: int = DEFAULT_SIZE) -> Dataset:
    """`size` letter-counting conversations with a calculator call each."""
    words = english_words()
    rows = seeded_examples(size, split, "spelling_bee", lambda rng: conversation(rng, words))
    return conversation_dataset(rows, EXTRA, where=f"spelling_bee {split}")
