"""Scaling laws and schedules shared by the training stages (spec §6.3-6.5).

One dial: `plan_training(config, reference_config=d12)` derives the target tokens, the auto total batch
(power law, a power of two), the batch LR factor, the T_epoch weight decay, the horizon and the gradient
accumulation; `lr_multiplier`, `muon_momentum` and `muon_weight_decay` are the per-step schedules. The width
factor of the AdamW LRs is part of the optimizer's group definition (`training.muon.dmodel_lr_scale`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

REFERENCE_BATCH_TOKENS = 2**19  # B_REF: the d12 reference run's total batch, in tokens


def batch_lr_scale(total_batch_tokens: int, reference_batch_tokens: int = REFERENCE_BATCH_TOKENS) -> float:
    """sqrt(B / B_REF): multiplies the embedding, unembedding, scalar and matrix LRs (not the
    fixed smear/backout LR). 1.0 at 2**19 tokens, 1.414 at 2**20, 0.177 for runcpu's 16384."""
    if total_batch_tokens <= 0 or reference_batch_tokens <= 0:
        raise ValueError(
            f"batch_lr_scale: batch sizes must be positive, got total_batch_tokens={total_batch_tokens}, "
            f"reference_batch_tokens={reference_batch_tokens}"
        )
    return math.sqrt(total_batch_tokens / reference_batch_tokens)


# --------------------------------------------------------------------------- training horizon (§6.3-6.4)
POWER_LINES_EXPONENT = 0.383  # batch size grows with data as D ** 0.383 (Power Lines)
REFERENCE_DEPTH = 12


def scaling_params(config) -> int:
    """N_scal = transformer matrices + lm_head (§1.9), counted on the meta device."""
    from modeling_nanochat import count_flops_and_params

    _, counts = count_flops_and_params(config)
    return counts["transformer_matrices"] + counts["lm_head"]


def auto_total_batch_size(target_tokens: int, reference_target_tokens: int) -> int:
    """B = 2 ** round(log2(B_REF * (D / D_REF) ** 0.383)), a power of two."""
    ratio = target_tokens / reference_target_tokens
    return 2 ** round(math.log2(REFERENCE_BATCH_TOKENS * ratio**POWER_LINES_EXPONENT))


def scaled_weight_decay(weight_decay: float, total_batch_tokens: int, target_tokens: int,
                        reference_target_tokens: int) -> float:
    """The T_epoch rule: lambda = lambda_ref * sqrt(B / B_REF) * (D_REF / D) (Muon groups only)."""
    return weight_decay * math.sqrt(total_batch_tokens / REFERENCE_BATCH_TOKENS) * (reference_target_tokens / target_tokens)


def grad_accum_steps(total_batch_tokens: int, device_batch_size: int, seq_len: int, world_size: int) -> int:
    """Micro-steps per optimizer step; the total batch must be a multiple of one micro-step's tokens."""
    per_step = device_batch_size * seq_len * world_size
    if per_step <= 0:
        raise ValueError(f"device_batch_size, seq_len and world_size must be positive (got {device_batch_size}, "
                         f"{seq_len}, {world_size})")
    if total_batch_tokens % per_step != 0:
        raise ValueError(
            f"total batch {total_batch_tokens:,} tokens is not a multiple of device_batch_size x seq_len x "
            f"world_size = {device_batch_size} x {seq_len} x {world_size} = {per_step:,} tokens; change "
            f"--total-batch-size to a multiple of {per_step:,} or --device-batch-size so that it divides "
            f"{total_batch_tokens // (seq_len * world_size) if total_batch_tokens % (seq_len * world_size) == 0 else 'it'}"
        )
    return total_batch_tokens // per_step


@dataclass(frozen=True)
class TrainingPlan:
    """Everything the one dial (depth) decides: batch, horizon, LR scale, weight decay, accumulation."""

    scaling_params: int
    reference_scaling_params: int
    target_tokens: int
    total_batch_size: int
    num_iterations: int
    batch_lr_scale: float
    weight_decay: float
    grad_accum_steps: int
    flops_per_token: float

    @property
    def total_tokens(self) -> int:
        return self.total_batch_size * self.num_iterations

    @property
    def total_flops(self) -> float:
        return self.flops_per_token * self.total_tokens


def plan_training(config, *, reference_config, target_param_data_ratio: float = 12, num_iterations: int = -1,
                  target_flops: float = -1, total_batch_size: int = -1, device_batch_size: int = 32,
                  world_size: int = 1, weight_decay: float = 0.28) -> TrainingPlan:
    """Spec §6.3: `reference_config` is d12 with the same aspect ratio, head dim, context and windows.

    Horizon precedence: num_iterations > 0, else target_flops > 0 (N = round(F / (flops_per_token * B))),
    else the tokens:params ratio (N = D // B).
    """
    from modeling_nanochat import count_flops_and_params

    flops_per_token, counts = count_flops_and_params(config)
    n_scal = counts["transformer_matrices"] + counts["lm_head"]
    n_ref = scaling_params(reference_config)
    ratio = target_param_data_ratio
    if ratio <= 0 and num_iterations <= 0 and target_flops <= 0:
        raise ValueError("set one of num_iterations, target_flops or target_param_data_ratio to a positive value")
    ref_ratio = ratio if ratio > 0 else 12
    target_tokens = int(ref_ratio * n_scal)
    reference_tokens = ref_ratio * n_ref
    batch = total_batch_size if total_batch_size > 0 else auto_total_batch_size(target_tokens, reference_tokens)
    if num_iterations > 0:
        steps = num_iterations
    elif target_flops > 0:
        steps = round(target_flops / (flops_per_token * batch))
    else:
        steps = target_tokens // batch
    if steps <= 0:
        raise ValueError(f"the plan has {steps} steps: the model is too small for a {batch:,}-token batch at this "
                         "horizon; lower --total-batch-size or raise the ratio/flops/iterations")
    return TrainingPlan(
        scaling_params=n_scal,
        reference_scaling_params=n_ref,
        target_tokens=target_tokens,
        total_batch_size=batch,
        num_iterations=steps,
        batch_lr_scale=batch_lr_scale(batch),
        weight_decay=scaled_weight_decay(weight_decay, batch, target_tokens, reference_tokens),
        grad_accum_steps=grad_accum_steps(batch, device_batch_size, config.max_position_embeddings, world_size),
        flops_per_token=flops_per_token,
    )


# --------------------------------------------------------------------------- schedules (§6.5)
def lr_multiplier(step: int, num_iterations: int, warmup_steps: int = 40, warmdown_ratio: float = 0.65,
                  final_lr_frac: float = 0.05) -> float:
    """Linear warmup, constant, then linear warmdown to `final_lr_frac` over round(ratio * N) steps."""
    warmdown = round(warmdown_ratio * num_iterations)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step <= num_iterations - warmdown:
        return 1.0
    progress = (num_iterations - step) / warmdown
    return progress + (1 - progress) * final_lr_frac


def muon_momentum(step: int, num_iterations: int, warmdown_ratio: float = 0.65) -> float:
    """0.85 -> 0.97 over the first 400 steps, 0.97, then 0.97 -> 0.90 over the warmdown."""
    warmdown = round(warmdown_ratio * num_iterations)
    if step < 400:
        return 0.85 + (0.97 - 0.85) * step / 400
    if step >= num_iterations - warmdown and warmdown > 0:
        frac = (step - (num_iterations - warmdown)) / warmdown
        return 0.97 + (0.90 - 0.97) * frac
    return 0.97


def muon_weight_decay(step: int, num_iterations: int, weight_decay: float) -> float:
    """Cosine from `weight_decay` to ~0 over the run."""
    return weight_decay * 0.5 * (1 + math.cos(math.pi * step / num_iterations))
