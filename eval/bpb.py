"""Bits per byte (spec §6.8): a tokenizer-independent validation loss.

For every target position that is not ignored (target >= 0) and whose token has a byte length
(special tokens have 0 and are excluded): total_nats += per-token loss, total_bytes += its bytes.
bpb = total_nats / (ln 2 * total_bytes). Both sums are all-reduced across ranks when
`torch.distributed` is initialized, so every rank returns the global figure.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

from eval.metrics.bits_per_byte.bits_per_byte import bits_per_byte


@torch.no_grad()
def evaluate_bpb(model, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], steps: int,
                 token_bytes: torch.Tensor) -> float:
    """bpb of `model` over `steps` batches of pre-shifted (inputs, targets) with ignore index -1.

    `model(input_ids=..., targets=..., loss_reduction="none")` must return per-position losses, as
    NanoChatForCausalLM does; any other HF causal LM is scored from its logits.
    """
    if steps <= 0:
        raise ValueError(f"evaluate_bpb: steps must be positive, got {steps}")
    was_training = model.training
    model.eval()
    device = token_bytes.device
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    batches = iter(batches)
    for _ in range(steps):
        inputs, targets = next(batches)
        losses = per_token_loss(model, inputs, targets).reshape(-1)
        flat_targets = targets.reshape(-1).to(device)
        valid = flat_targets >= 0
        nbytes = torch.where(valid, token_bytes[flat_targets.clamp(min=0)], torch.zeros_like(flat_targets))
        counted = nbytes > 0
        total_nats += (losses.to(device).double() * counted).sum()
        total_bytes += nbytes.sum()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total_nats, op=dist.ReduceOp.SUM)
        dist.all_reduce(total_bytes, op=dist.ReduceOp.SUM)
    model.train(was_training)
    return bits_per_byte(total_nats.item(), total_bytes.item())


def per_token_loss(model, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-position cross entropy (B*T,), 0 at ignored positions."""
    try:
        return model(input_ids=inputs, targets=targets, loss_reduction="none", use_cache=False).loss
    except TypeError:  # a plain HF causal LM: score its logits
        logits = model(input_ids=inputs, use_cache=False).logits.float()
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1, reduction="none"
        )
