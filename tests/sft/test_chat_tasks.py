"""Chat tasks: every task renders through the chat template with nanochat's masks; Hub paths on local
fixtures; formats (GSM8K tool calls, spelling); mixtures; clear errors on bad data."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from datasets import Dataset
from sft_testdata import GSM8K_ROWS, SMOLTALK_ROWS, write_jsonl

from modeling_nanochat.generation_nanochat import use_calculator
from modeling_nanochat.tokenization_nanochat import render_conversation
from training.tasks import TaskDataError, TaskSpec, build_mixture, load_mixture, load_task
from training.tasks.gsm8k import answer_parts, reward
from training.tasks.identity import write_identity_jsonl


@pytest.fixture(scope="module")
def hub_fixtures(tmp_path_factory):
    """Local copies in the Hub schemas: SmolTalk (parquet folder), GSM8K (jsonl), MMLU auxiliary_train
    (nested rows), ARC (digit labels)."""
    root = tmp_path_factory.mktemp("hub")
    (root / "smoltalk" / "data").mkdir(parents=True)
    Dataset.from_list(SMOLTALK_ROWS).to_parquet(root / "smoltalk" / "data" / "train-00000-of-00001.parquet")
    write_jsonl(root / "gsm8k.jsonl", GSM8K_ROWS)
    write_jsonl(root / "mmlu_aux.jsonl", [{"train": {"question": "2+2?", "subject": "", "choices": ["3", "4", "5", "6"],
                                                     "answer": 1}}])
    write_jsonl(root / "arc.jsonl", [{"id": "x1", "question": "Which is a metal?", "answerKey": "2",
                                      "choices": {"text": ["wood", "iron", "glass"], "label": ["1", "2", "3"]}}])
    return root


def task_samples(hub_fixtures):
    yield "smoltalk", load_task("smoltalk", "train", source=str(hub_fixtures / "smoltalk"))
    yield "gsm8k(hub)", load_task("gsm8k", "train", source=str(hub_fixtures / "gsm8k.jsonl"))
    yield "gsm8k", load_task("gsm8k", "test").select(range(3))
    yield "mmlu", load_task("mmlu", "dev").select(range(3))
    yield "mmlu(hub)", load_task("mmlu", "auxiliary_train", source=str(hub_fixtures / "mmlu_aux.jsonl"))
    yield "arc_easy", load_task("arc_easy", "test").select(range(3))
    yield "arc_challenge", load_task("arc_challenge", "validation").select(range(3))
    yield "arc(hub)", load_task("arc_easy", "train", source=str(hub_fixtures / "arc.jsonl"))
    yield "humaneval", load_task("humaneval", "test").select(range(2))
    yield "identity", load_task("identity").select(range(3))
    yield "simple_spelling", load_task("simple_spelling", "train", size=3)
    yield "spelling_bee", load_task("spelling_bee", "train", size=3)
    yield "chatterbot", load_task("chatterbot", "train").select(range(3))


def test_every_task_renders_through_the_chat_template_with_nanochat_masks(tokenizer, hub_fixtures):
    special = {name: tokenizer.convert_tokens_to_ids(name) for name in
               ("<|assistant_end|>", "<|python_start|>", "<|output_start|>", "<|output_end|>", "<|user_start|>")}
    seen_tool = set()
    for name, ds in task_samples(hub_fixtures):
        assert len(ds) > 0, name
        for row in ds:
            out = tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True,
                                                return_assistant_tokens_mask=True)
            ids, mask = render_conversation(tokenizer, row["messages"], max_tokens=None)
            assert list(out["input_ids"]) == ids, name
            assert list(out["assistant_masks"]) == mask, name
            supervised = {t for t, m in zip(ids, mask) if m}
            unsupervised = {t for t, m in zip(ids, mask) if not m}
            assert special["<|assistant_end|>"] in supervised, name
            assert special["<|user_start|>"] in unsupervised, name
            if special["<|python_start|>"] in ids:  # tool calls are learned, tool outputs never
                seen_tool.add(name)
                assert special["<|python_start|>"] in supervised
                assert {special["<|output_start|>"], special["<|output_end|>"]} <= unsupervised
                assert special["<|output_start|>"] not in supervised
    assert seen_tool == {"gsm8k(hub)", "gsm8k", "spelling_bee"}


def test_hub_schemas_load_from_local_copies(hub_fixtures):
    smol = load_task("smoltalk", "train", source=str(hub_fixtures / "smoltalk"))
    assert len(smol) == 2 and smol.column_names == ["messages"]
    with_system = next(r for r in smol if r["messages"][0]["role"] == "system")
    assert with_system["messages"][0]["content"] == [{"type": "text", "text": "You are terse."}]
    mmlu = load_task("mmlu", "auxiliary_train", source=str(hub_fixtures / "mmlu_aux.jsonl"))[0]
    assert mmlu["answer"] == "B" and mmlu["letters"] == ["A", "B", "C", "D"]
    assert mmlu["messages"][0]["content"][0]["text"] == (
        "Multiple Choice question: 2+2?\n- 3=A\n- 4=B\n- 5=C\n- 6=D\n\nRespond only with the letter of the correct answer.")
    arc = load_task("arc_easy", "train", source=str(hub_fixtures / "arc.jsonl"))[0]
    assert arc["letters"] == ["1", "2", "3"] and arc["messages"][1]["content"][0]["text"] == "2"


def test_gsm8k_annotations_become_calculator_calls(hub_fixtures):
    parts = answer_parts("Half of 1,000 is 1000/2=<<1000/2=500>>500.\nSo <<500+1>>x\n#### 500")
    assert parts == [
        {"type": "text", "text": "Half of 1,000 is 1000/2="}, {"type": "python", "text": "1000/2"},
        {"type": "python_output", "text": "500"}, {"type": "text", "text": "500.\nSo "},
        {"type": "python", "text": "500+1"}, {"type": "python_output", "text": ""}, {"type": "text", "text": "x\n#### 500"}]
    rows = load_task("gsm8k", "train", source=str(hub_fixtures / "gsm8k.jsonl"))
    by_answer = {r["answer"]: r for r in rows}
    assert set(by_answer) == {"10", "9", "300"}
    for part in by_answer["300"]["messages"][1]["content"]:
        if part["type"] == "python":  # every reference call evaluates to its recorded output
            assert str(use_calculator(part["text"])).removesuffix(".0") == "300"
    assert reward("so\n#### 1,200", "1200") == 1.0 and reward("#### 12", "1200") == 0.0 and reward("no", "1") == 0.0


def test_spelling_tasks_are_deterministic_and_consistent():
    simple = load_task("simple_spelling", "train", size=5)
    for row in simple:
        word = row["messages"][0]["content"][0]["text"].removeprefix("Spell the word: ")
        assert row["messages"][1]["content"][0]["text"] == f"{word}:{','.join(word)}"
    bee = load_task("spelling_bee", "train", size=20)
    assert bee[:] == load_task("spelling_bee", "train", size=20)[:]
    assert bee[0]["messages"] != load_task("spelling_bee", "test", size=1)[0]["messages"]
    for row in bee:
        parts = row["messages"][1]["content"]
        assert [p["type"] for p in parts] == ["text", "text", "python", "python_output", "text"]
        assert use_calculator(parts[2]["text"]) == int(row["answer"]) == int(parts[3]["text"])
        assert parts[-1]["text"].endswith(f"#### {row['answer']}")


def test_identity_jsonl_round_trip_names_the_model(tmp_path):
    path = write_identity_jsonl(tmp_path / "identity.jsonl", model_name="tinychat", n=30)
    ds = load_task("identity", path=str(path))
    assert len(ds) == 30
    text = " ".join(p["text"] for r in ds for m in r["messages"] for p in m["content"])
    assert "tinychat" in text and "nanochat is" not in text


def test_mixture_epochs_and_deterministic_shuffle():
    a = Dataset.from_dict({"messages": [[{"role": "user", "content": [{"type": "text", "text": f"a{i}"}]}] for i in range(5)]})
    b = Dataset.from_dict({"messages": [[{"role": "user", "content": [{"type": "text", "text": f"b{i}"}]}] for i in range(3)]})
    mixed = build_mixture([("a", a, 1), ("b", b, 3)])
    assert Counter(mixed["task"]) == {"a": 5, "b": 9}
    assert mixed[:] == build_mixture([("a", a, 1), ("b", b, 3)])[:]
    order = [m[0]["content"][0]["text"] for m in mixed["messages"]]
    assert order != sorted(order) and Counter(order)["b0"] == 3
    assert build_mixture([("a", a, 1), ("b", b, 3)], seed=1)["task"] != mixed["task"]


@pytest.mark.parametrize("make, match", [
    (lambda d: load_task("gsm8k", "train", source=str(write_jsonl(d / "g.jsonl", [{"question": "q"}]))),
     r"missing column\(s\) \['answer'\]"),
    (lambda d: load_task("gsm8k", "train", source=str(write_jsonl(d / "g.jsonl", [{"question": "q", "answer": "7"}]))),
     "no '#### <number>' line"),
    (lambda d: load_task("smoltalk", "train", source=str(write_jsonl(d / "s.jsonl", [{"messages": [
        {"role": "user", "content": "hi"}, {"role": "narrator", "content": "..."}]}]))), "row 0.*unknown role 'narrator'"),
    (lambda d: load_task("smoltalk", "train", source=str(write_jsonl(d / "s.jsonl", [{"messages": [
        {"role": "user", "content": "hi"}]}]))), "last message must be the assistant's"),
    (lambda d: load_task("gsm8k", "train", source=str(_empty_parquet(d))), "is empty"),
    (lambda d: load_task("identity", path=str(write_jsonl(d / "i.jsonl", [[{"role": "user", "content": "a"},
                                                                           {"role": "user", "content": "b"}]]))),
     r"i.jsonl:1: message 1 has role 'user', expected 'assistant'"),
    (lambda d: load_task("identity", path=str(d / "missing.jsonl")), "does not exist"),
    (lambda d: load_task("mmlu", "train"), "unknown split 'train'"),
    (lambda d: load_task("squad"), "unknown task 'squad'"),
    (lambda d: load_mixture([TaskSpec("gsm8k", "test")]), "refusing to train on test split"),
    (lambda d: build_mixture([("empty", Dataset.from_dict({"messages": []}), 1)]), "is empty"),
])
def test_bad_task_data_raises_clear_errors(tmp_path, make, match):
    with pytest.raises(TaskDataError, match=match):
        make(tmp_path)


def _empty_parquet(d):
    path = d / "empty.parquet"
    Dataset.from_dict({"question": [], "answer": []}).to_parquet(path)
    return path


def test_identity_file_is_the_originals_format(tmp_path):
    path = write_identity_jsonl(tmp_path / "i.jsonl", n=3)
    first = json.loads(path.read_text().splitlines()[0])
    assert isinstance(first, list) and [m["role"] for m in first][:2] == ["user", "assistant"]
    assert all(isinstance(m["content"], str) for m in first)
