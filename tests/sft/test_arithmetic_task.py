"""The generated arithmetic task: calculator calls whose output is right, never supervised, masks as the spec."""

from modeling_nanochat.generation_nanochat import use_calculator
from training.tasks import load_task
from training.tasks.common import extract_answer


def test_arithmetic_rows_agree_with_the_calculator():
    train, test = load_task("arithmetic", "train", size=300), load_task("arithmetic", "test", size=300)
    assert len(train) == 300
    ops = set()
    for row in train:
        user, reply = row["messages"]
        python, output, text = reply["content"]
        assert python["type"] == "python" and output["type"] == "python_output"
        assert str(use_calculator(python["text"])) == output["text"] == row["answer"]
        assert extract_answer(text["text"]) == row["answer"]
        ops.add(next(op for op in "*+-" if op in python["text"][1:]))
    assert ops == {"*", "+", "-"}
    questions = [r["messages"][0]["content"][0]["text"] for r in train]
    test_questions = [r["messages"][0]["content"][0]["text"] for r in test]
    # disjoint seeds: different problems, overlapping only by chance (the problem space is ~10^5)
    assert sum(a == b for a, b in zip(questions, test_questions)) == 0
    assert len(set(questions) & set(test_questions)) < 15


def test_arithmetic_is_in_the_demo_mixture_and_not_its_test_split():
    from training.tasks.mixture import preset

    train, val = preset("demo")
    assert ("arithmetic", "train") in {(s.name, s.split) for s in train}
    assert ("arithmetic", "test") in {(s.name, s.split) for s in val}
