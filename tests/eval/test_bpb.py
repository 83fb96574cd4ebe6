"""Bits per byte (spec §6.8) against a hand computation."""

import math

import pytest
import torch

from eval.bpb import evaluate_bpb


def test_bpb_matches_hand_computation(make_model):
    model = make_model()
    gen = torch.Generator().manual_seed(0)
    token_bytes = torch.randint(1, 5, (200,), generator=gen)
    token_bytes[:3] = 0  # "special tokens" have no bytes
    batches = []
    for _ in range(3):
        inputs = torch.randint(0, 200, (2, 16), generator=gen)
        targets = torch.randint(0, 200, (2, 16), generator=gen)
        targets[0, :4] = -1  # ignored positions
        targets[1, 5] = 1  # a zero-byte target: excluded from both sums
        batches.append((inputs, targets))
    nats, nbytes = 0.0, 0
    with torch.no_grad():
        for inputs, targets in batches:
            logp = model(inputs).logits.log_softmax(-1)
            for b in range(2):
                for t in range(16):
                    y = targets[b, t].item()
                    if y >= 0 and token_bytes[y] > 0:
                        nats -= logp[b, t, y].item()
                        nbytes += token_bytes[y].item()
    got = evaluate_bpb(model, batches, 3, token_bytes)
    assert got == pytest.approx(nats / (math.log(2) * nbytes), rel=1e-6)


def test_bpb_without_bytes_is_inf(make_model):
    model = make_model()
    inputs = torch.randint(0, 200, (1, 8))
    assert evaluate_bpb(model, [(inputs, torch.full((1, 8), -1))], 1, torch.ones(200, dtype=torch.long)) == math.inf
    with pytest.raises(ValueError, match="steps must be positive"):
        evaluate_bpb(model, [], 0, torch.ones(200))
