"""The local `evaluate` modules: loadable by path, offline, and equal to hand computations."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch

METRICS = Path(__file__).resolve().parents[2] / "eval" / "metrics"


@pytest.fixture(scope="module")
def load():
    import evaluate

    return lambda name: evaluate.load(str(METRICS / name))


def brute_force_pass_at_k(outcomes: list[bool], k: int) -> float:
    subsets = list(itertools.combinations(outcomes, k))
    return sum(any(s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_brute_force(load):
    problems = [[True, False, False, True, False], [False] * 5, [True] * 5, [False, False, True, False, False]]
    got = load("pass_at_k").compute(predictions=problems, k=[1, 2, 5])
    for k in (1, 2, 5):
        expected = sum(brute_force_pass_at_k(p, k) for p in problems) / len(problems)
        assert got[f"pass@{k}"] == pytest.approx(expected)
    first = load("pass_at_k").compute(predictions=[[False, True], [False, False]], k=[1, 2], estimator="first_k")
    assert first == {"pass@1": 0.0, "pass@2": 0.5}
    with pytest.raises(ValueError, match="needs 1 <= k <= n"):
        load("pass_at_k").compute(predictions=[[True]], k=3)


def test_centered_accuracy(load):
    got = load("centered_accuracy").compute(predictions=[0, 1, 1, 2], references=[0, 1, 0, 2], random_baseline=25.0)
    assert got["accuracy"] == 0.75 and got["centered_accuracy"] == pytest.approx((0.75 - 0.25) / 0.75)
    from eval.metrics.centered_accuracy.centered_accuracy import centered_accuracy, core_score

    assert centered_accuracy(0.62, 62.0) == pytest.approx(0.0) and centered_accuracy(0.5, 62.0) < 0
    assert core_score([0.1, 0.3]) == pytest.approx(0.2) and math.isnan(core_score([]))
    with pytest.raises(ValueError, match=r"percentage in \[0, 100\)"):
        centered_accuracy(0.5, 100)


def test_bits_per_byte_module_agrees_with_evaluate_bpb(load, make_model):
    from eval.bpb import evaluate_bpb, per_token_loss

    model = make_model()
    gen = torch.Generator().manual_seed(1)
    token_bytes = torch.randint(0, 4, (200,), generator=gen)
    inputs = torch.randint(0, 200, (2, 12), generator=gen)
    targets = torch.randint(0, 200, (2, 12), generator=gen)
    with torch.no_grad():
        losses = per_token_loss(model, inputs, targets).reshape(-1).tolist()
    nbytes = token_bytes[targets.reshape(-1)].tolist()
    got = load("bits_per_byte").compute(predictions=losses, references=nbytes)
    assert got["bits_per_byte"] == pytest.approx(evaluate_bpb(model, [(inputs, targets)], 1, token_bytes), rel=1e-6)
    assert got["total_bytes"] == sum(nbytes)
    assert load("bits_per_byte").compute(predictions=[1.0], references=[0])["bits_per_byte"] == math.inf
