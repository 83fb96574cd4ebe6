"""Scaling laws and schedules against the spec's worked numbers (§6.3-6.5, §6.13)."""

import pytest

from modeling_nanochat import NanoChatConfig
from training import scaling as S

WORKED = {  # depth: (ratio, auto B, steps N, batch LR scale, Muon lambda)
    12: (12, 524_288, 2_520, 1.0, 0.28),
    20: (12, 1_048_576, 4_980, 1.414, 0.1002),
    24: (8, 1_048_576, 5_568, 1.414, 0.0597),
    26: (12, 1_048_576, 10_510, 1.414, 0.0475),
}


@pytest.mark.parametrize("depth", sorted(WORKED))
def test_worked_numbers(depth):
    ratio, batch, steps, lr_scale, wd = WORKED[depth]
    plan = S.plan_training(NanoChatConfig.from_depth(depth), reference_config=NanoChatConfig.from_depth(12),
                           target_param_data_ratio=ratio, device_batch_size=16, world_size=8)
    assert plan.total_batch_size == batch
    assert plan.num_iterations == steps
    assert plan.batch_lr_scale == pytest.approx(lr_scale, abs=5e-4)
    assert plan.weight_decay == pytest.approx(wd, abs=5e-5)
    assert plan.grad_accum_steps == batch // (16 * 2048 * 8)
    if depth == 24:
        assert plan.total_tokens == 5_838_471_168
        assert plan.total_flops == pytest.approx(2.79e19, rel=5e-3)


@pytest.mark.parametrize("depth,batch", [(8, 2**18), (10, 2**19), (16, 2**19), (18, 2**20), (32, 2**21)])
def test_auto_batch_depends_only_on_depth(depth, batch):
    plan = S.plan_training(NanoChatConfig.from_depth(depth), reference_config=NanoChatConfig.from_depth(12),
                           device_batch_size=1, world_size=1)
    assert plan.total_batch_size == batch


def test_horizon_precedence():
    cfg, ref = NanoChatConfig.from_depth(12), NanoChatConfig.from_depth(12)
    assert S.plan_training(cfg, reference_config=ref, num_iterations=7, target_flops=1e18).num_iterations == 7
    plan = S.plan_training(cfg, reference_config=ref, target_flops=1e18, target_param_data_ratio=-1)
    assert plan.num_iterations == round(1e18 / (plan.flops_per_token * plan.total_batch_size))


def test_grad_accum_error_says_what_to_change():
    assert S.grad_accum_steps(2**20, 16, 2048, 8) == 4
    with pytest.raises(ValueError, match="not a multiple of device_batch_size x seq_len x world_size"):
        S.grad_accum_steps(2**20, 24, 2048, 8)


def test_lr_schedule():
    n = 1000
    assert S.lr_multiplier(0, n) == pytest.approx(1 / 40)
    assert S.lr_multiplier(39, n) == 1.0
    assert S.lr_multiplier(350, n) == 1.0  # warmdown = 650 steps: constant until step 350
    assert S.lr_multiplier(351, n) < 1.0
    assert S.lr_multiplier(n, n) == pytest.approx(0.05)
    assert S.lr_multiplier(675, n) == pytest.approx(0.5 + 0.5 * 0.05)


def test_momentum_and_weight_decay_schedules():
    n = 2000
    assert S.muon_momentum(0, n) == pytest.approx(0.85)
    assert S.muon_momentum(200, n) == pytest.approx(0.91)
    assert S.muon_momentum(400, n) == 0.97
    assert S.muon_momentum(n, n) == pytest.approx(0.90)
    assert S.muon_momentum(n - 1300, n) == pytest.approx(0.97)  # warmdown = round(0.65 n) = 1300
    assert S.muon_momentum(n - 650, n) == pytest.approx(0.935)
    assert S.muon_weight_decay(0, n, 0.2) == pytest.approx(0.2)
    assert S.muon_weight_decay(n // 2, n, 0.2) == pytest.approx(0.1)
    assert S.muon_weight_decay(n, n, 0.2) == pytest.approx(0.0, abs=1e-12)
