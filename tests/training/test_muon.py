"""MuonAdamW (training/muon.py) against independent, straightforward transcriptions of spec §5."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from training.muon import (
    MuonAdamW,
    MuonAdamWFactory,
    dmodel_lr_scale,
    muon_update_,
    nanochat_param_groups,
    polar_express,
)
from training.scaling import batch_lr_scale

# Spec §5.3, typed again here so the reference does not share the implementation's table.
SPEC_COEFFS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


# ---------------------------------------------------------------------------------- references


def ref_polar(X: torch.Tensor, steps: int) -> torch.Tensor:
    """One matrix, float64, the spec's tall/wide branches written out."""
    X = X / (1.01 * torch.linalg.matrix_norm(X) + 1e-6)
    m, n = X.shape
    for a, b, c in SPEC_COEFFS[:steps]:
        if m > n:
            A = X.T @ X
            X = a * X + X @ (b * A + c * (A @ A))
        else:
            A = X @ X.T
            X = a * X + (b * A + c * (A @ A)) @ X
    return X


def ref_muon_step(P, G, M, V, *, mu, lr, wd, beta2, steps):
    """Spec §5.3 for one matrix, float64, stage by stage. Returns new (P, M, V)."""
    P, G, M, V = (t.double() for t in (P, G, M, V))
    m, n = P.shape
    M = mu * M + (1 - mu) * G  # Nesterov momentum
    g = (1 - mu) * G + mu * M
    target = torch.linalg.matrix_norm(g) / math.sqrt(m)  # MuonEq: every row to norm `target`
    g = torch.stack([row * (target / max(row.norm().item(), 1e-6)) for row in g])
    g = ref_polar(g, steps)
    g = g * math.sqrt(min(m, n)) / max(torch.linalg.matrix_norm(g).item(), 1e-6)  # Muon+
    if m >= n:  # NorMuon: one statistic per row
        v_mean, n_red = (g**2).mean(dim=1, keepdim=True), n
    else:  # one per column
        v_mean, n_red = (g**2).mean(dim=0, keepdim=True), m
    v_norm = math.sqrt(v_mean.sum().item() * n_red)
    V = beta2 * V + (1 - beta2) * v_mean
    step = 1 / V.clamp_min(1e-10).sqrt()
    v_norm_new = math.sqrt((v_mean * n_red * step**2).sum().item())
    g = g * step * (v_norm / max(v_norm_new, 1e-10))
    lr_eff = lr * math.sqrt(max(1.0, m / n))  # tall matrices only
    mask = (g * P >= 0).double()  # cautious weight decay
    P = P - lr_eff * g - lr_eff * wd * P * mask
    return P, M, V


def ref_adamw(p, grads, *, lr, betas, eps, wd):
    """Spec §5.2 by hand, in Python floats, elementwise."""
    p = [float(x) for x in p.flatten()]
    m = [0.0] * len(p)
    v = [0.0] * len(p)
    b1, b2 = betas
    for step, g in enumerate(grads, start=1):
        g = [float(x) for x in g.flatten()]
        for i in range(len(p)):
            p[i] *= 1 - lr * wd
            m[i] = b1 * m[i] + (1 - b1) * g[i]
            v[i] = b2 * v[i] + (1 - b2) * g[i] ** 2
            p[i] -= (lr / (1 - b1**step)) * m[i] / (math.sqrt(v[i] / (1 - b2**step)) + eps)
    return torch.tensor(p, dtype=torch.float64)


# ---------------------------------------------------------------------------------- fixtures


def tiny_config(**kwargs):
    from modeling_nanochat import NanoChatConfig

    return NanoChatConfig.from_depth(2, aspect_ratio=32, head_dim=32, vocab_size=300, max_seq_len=64, **kwargs)


def tiny_model(seed: int = 0, **kwargs) -> nn.Module:
    from modeling_nanochat import NanoChatForCausalLM

    torch.manual_seed(seed)
    return NanoChatForCausalLM(tiny_config(**kwargs))


def batches(n: int, seed: int = 1, rows: int = 4, seq: int = 16) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 300, (rows, seq), generator=gen) for _ in range(n)]


def train(model: nn.Module, opt: torch.optim.Optimizer, data: list[torch.Tensor]) -> list[float]:
    losses = []
    for x in data:
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def ids(tensors) -> list[int]:
    return [id(t) for t in tensors]


def muon_only(params, **kw) -> MuonAdamW:
    return MuonAdamW([{"kind": "muon", "params": params, **kw}])


# ---------------------------------------------------------------------------------- the math


@pytest.mark.parametrize("shape", [(48, 12), (12, 48), (20, 20), (3, 24, 12), (2, 10, 30)],
                         ids=["tall", "wide", "square", "batched-tall", "batched-wide"])
def test_polar_express_singular_values_in_band(shape):
    torch.manual_seed(0)
    G = torch.randn(*shape)
    X = polar_express(G, 5)
    s = torch.linalg.svdvals(X)
    assert s.min() > 0.8 and s.max() < 1.2, (s.min(), s.max())
    # ... and X has G's polar factor U·Vᵀ (only the singular values moved)
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    U2, _, Vh2 = torch.linalg.svd(X.double(), full_matrices=False)
    torch.testing.assert_close(U2 @ Vh2, U @ Vh, atol=1e-4, rtol=0)
    # batched == one at a time, both branches == the reference
    for i, g in enumerate(G.reshape(-1, *shape[-2:])):
        torch.testing.assert_close(X.reshape(-1, *shape[-2:])[i].double(), ref_polar(g.double(), 5),
                                   atol=2e-5, rtol=0)


def test_muon_update_every_stage_matches_reference():
    """Three steps of the fused stacked kernel == the per-matrix float64 transcription."""
    torch.manual_seed(0)
    for m, n in [(24, 8), (8, 24), (12, 12)]:
        K = 3
        P = torch.randn(K, m, n) * 0.1
        M = torch.zeros(K, m, n)
        V = torch.zeros(K, m, 1) if m >= n else torch.zeros(K, 1, n)
        refs = [(P[k].double(), M[k].double(), V[k].double()) for k in range(K)]
        for step, (mu, lr, wd, beta2) in enumerate([(0.85, 0.05, 0.2, 0.9), (0.9, 0.02, 0.5, 0.95),
                                                     (0.97, 0.03, 0.0, 0.5)]):
            G = torch.randn(K, m, n)
            lr_eff = lr * math.sqrt(max(1, m / n))
            t = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
            muon_update_(P, G.clone(), M, V, t(mu), t(lr_eff), t(wd), t(beta2), 5, torch.float32)
            refs = [ref_muon_step(Pk, Gk, Mk, Vk, mu=mu, lr=lr, wd=wd, beta2=beta2, steps=5)
                    for (Pk, Mk, Vk), Gk in zip(refs, G)]
            for k in range(K):
                for ours, ref, what in zip((P[k], M[k], V[k]), refs[k], ("param", "momentum", "second moment")):
                    torch.testing.assert_close(ours.double(), ref, atol=2e-6, rtol=1e-4,
                                               msg=lambda s, w=f"{what} {m}x{n} step {step}": f"{w}: {s}")


def test_optimizer_muon_group_matches_reference_with_shape_lr_multiplier():
    """Through MuonAdamW: per-shape stacking and sqrt(max(1, m/n)) (fc1-like 4C×C: ×2; C×4C: ×1)."""
    torch.manual_seed(0)
    C = 8
    shapes = [(4 * C, C), (C, 4 * C), (C, C), (4 * C, C), (13, 12)]
    params = [nn.Parameter(torch.randn(*s) * 0.1) for s in shapes]
    opt = muon_only(params, lr=0.04, momentum=0.9, beta2=0.9, weight_decay=0.1)
    assert [tuple(g["params"][0].shape) for g in opt.param_groups] == [(8, 8), (8, 32), (13, 12), (32, 8)]
    assert [len(g["params"]) for g in opt.param_groups] == [1, 1, 1, 2]
    refs = [(p.detach().double(), torch.zeros(*p.shape, dtype=torch.float64),
             torch.zeros(p.shape[0], 1, dtype=torch.float64) if p.shape[0] >= p.shape[1]
             else torch.zeros(1, p.shape[1], dtype=torch.float64)) for p in params]
    for _ in range(2):
        grads = [torch.randn_like(p) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        refs = [ref_muon_step(P, g, M, V, mu=0.9, lr=0.04, wd=0.1, beta2=0.9, steps=5)
                for (P, M, V), g in zip(refs, grads)]
    for p, (P, _, _) in zip(params, refs):
        torch.testing.assert_close(p.detach().double(), P, atol=2e-6, rtol=1e-4)
    assert opt.state[params[0]]["momentum_buffer"].shape == (32, 8)
    assert opt.state[params[1]]["second_momentum_buffer"].shape == (1, 32)


def test_shape_lr_multiplier_values():
    from training.muon import _shape_lr_multiplier

    C = 64
    assert _shape_lr_multiplier((4 * C, C)) == 2.0  # mlp.fc1
    assert _shape_lr_multiplier((C, 4 * C)) == 1.0  # mlp.fc2
    assert _shape_lr_multiplier((C, C)) == 1.0
    assert _shape_lr_multiplier((13, 12)) == pytest.approx(math.sqrt(13 / 12))  # d26 ve_gate
    assert _shape_lr_multiplier((6, 12)) == 1.0


def test_cautious_weight_decay_only_where_update_and_weight_agree():
    torch.manual_seed(0)
    P0 = torch.randn(1, 16, 8)
    G = torch.randn(1, 16, 8)
    lr, wd = 0.01, 3.0
    results = []
    for decay in (0.0, wd):
        P = P0.clone()
        M, V = torch.zeros(1, 16, 8), torch.zeros(1, 16, 1)
        t = lambda x: torch.tensor(x)  # noqa: E731
        muon_update_(P, G.clone(), M, V, t(0.9), t(lr), t(decay), t(0.9), 5, torch.float32)
        results.append(P)
    update = (P0 - results[0]) / lr  # the orthogonalized, variance-reduced update g
    mask = (results[0] - results[1]) / (lr * wd * P0)  # 1 where decayed, 0 where not
    torch.testing.assert_close(mask, ((update * P0) >= 0).float(), atol=1e-3, rtol=0)
    assert 0 < mask.round().mean() < 1  # both cases occur


def test_adamw_step_equals_hand_computation():
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(4, 3))
    p0 = p.detach().clone()
    grads = [torch.randn(4, 3) for _ in range(3)]
    hp = {"lr": 0.1, "betas": (0.8, 0.95), "eps": 1e-10, "weight_decay": 0.05}
    opt = MuonAdamW([{"kind": "adamw", "params": [p], **hp}])
    for g in grads:
        p.grad = g.clone()
        opt.step()
    expected = ref_adamw(p0, grads, **{k: v for k, v in hp.items() if k != "weight_decay"}, wd=0.05)
    torch.testing.assert_close(p.detach().double().flatten(), expected, atol=1e-6, rtol=1e-5)
    assert opt.state[p]["step"].item() == 3


def test_bf16_parameters_keep_bf16_storage_and_do_fp32_math():
    torch.manual_seed(0)
    emb32 = torch.randn(10, 6)
    mat32 = torch.randn(12, 6) * 0.1
    grads = [(torch.randn(10, 6), torch.randn(12, 6)) for _ in range(3)]
    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        emb, mat = nn.Parameter(emb32.to(dtype, copy=True)), nn.Parameter(mat32.to(dtype, copy=True))
        opt = MuonAdamW([{"kind": "adamw", "params": [emb], "lr": 0.05, "betas": (0.8, 0.995)},
                         {"kind": "muon", "params": [mat], "lr": 0.05, "weight_decay": 0.1}])
        for ge, gm in grads:
            emb.grad, mat.grad = ge.to(dtype), gm.to(dtype)
            opt.step()
        assert emb.dtype == mat.dtype == dtype
        assert opt.state[emb]["exp_avg"].dtype == dtype and opt.state[mat]["momentum_buffer"].dtype == dtype
        runs[dtype] = (emb.detach().float(), mat.detach().float())
    for ours, ref in zip(runs[torch.bfloat16], runs[torch.float32]):
        assert torch.isfinite(ours).all()
        torch.testing.assert_close(ours, ref, atol=0.05, rtol=0.02)  # bf16 rounding of storage only
    # AdamW on bf16: fp32 math, rounded once on the way out (step 1: m̂/sqrt(v̂) = sign(g))
    p = nn.Parameter(emb32[:2].to(torch.bfloat16, copy=True))
    p.grad = emb32[2:4].to(torch.bfloat16, copy=True)
    expected = p.detach().float() * (1 - 0.1 * 0.01) - 0.1 * p.grad.float().sign()
    MuonAdamW([{"kind": "adamw", "params": [p], "lr": 0.1, "weight_decay": 0.01}]).step()
    assert p.dtype == torch.bfloat16
    torch.testing.assert_close(p.detach().float(), expected.bfloat16().float(), atol=0, rtol=0)


# ---------------------------------------------------------------------------------- groups


def test_param_groups_cover_every_parameter_exactly_once():
    model = tiny_model()
    groups = nanochat_param_groups(model)
    grouped = [p for g in groups for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped}) == len(list(model.parameters()))
    by_name = {g["name"]: g for g in groups}
    assert list(by_name) == ["lm_head", "embed_tokens", "value_embeds", "resid_lambdas", "x0_lambdas",
                             "smear_backout", "matrices"]
    named = dict(model.named_parameters())
    assert ids(by_name["lm_head"]["params"]) == ids([named["lm_head.weight"]])
    assert ids(by_name["embed_tokens"]["params"]) == ids([named["model.embed_tokens.weight"]])
    assert set(ids(by_name["smear_backout"]["params"])) == set(ids([named["model.smear_gate.weight"],
                                                                    named["model.smear_lambda"],
                                                                    named["model.backout_lambda"]]))
    layer1 = [named[f"model.layers.1.{x}.weight"] for x in ("self_attn.q_proj", "self_attn.k_proj",
              "self_attn.v_proj", "self_attn.o_proj", "self_attn.ve_gate", "mlp.fc1", "mlp.fc2")]
    matrices = by_name["matrices"]["params"]
    assert ids(matrices[-7:]) == ids(layer1)  # registration order, ve_gate after o_proj
    # C = 64: dmodel scale sqrt(768/64); spec §5.1 hyperparameters
    d = math.sqrt(768 / 64)
    expected = {"lm_head": (0.004 * d, (0.8, 0.96), 0.01), "embed_tokens": (0.2 * d, (0.8, 0.995), 0.001),
                "value_embeds": (0.1 * d, (0.8, 0.995), 0.01), "resid_lambdas": (0.005, (0.8, 0.95), 0.05),
                "x0_lambdas": (0.5, (0.96, 0.95), 0.0), "smear_backout": (0.2, (0.8, 0.95), 0.0)}
    for name, (lr, betas, wd) in expected.items():
        g = by_name[name]
        assert (g["kind"], g["betas"], g["weight_decay"], g["eps"]) == ("adamw", betas, wd, 1e-10)
        assert g["lr"] == pytest.approx(lr) and g["initial_lr"] == g["lr"]
    m = by_name["matrices"]
    assert (m["kind"], m["lr"], m["momentum"], m["beta2"], m["ns_steps"]) == ("muon", 0.02, 0.95, 0.9, 5)
    # the optimizer splits the Muon group per shape, sorted
    opt = MuonAdamW(groups)
    shapes = [tuple(g["params"][0].shape) for g in opt.param_groups if g["kind"] == "muon"]
    assert shapes == sorted(shapes) == [(2, 12), (64, 64), (64, 256), (256, 64)]
    assert [g["name"] for g in opt.param_groups[-4:]] == ["matrices[2x12]", "matrices[64x64]",
                                                         "matrices[64x256]", "matrices[256x64]"]


def test_param_groups_without_optional_parameters():
    model = tiny_model(use_value_embeds=False, use_smear=False, use_backout=False, use_residual_lambdas=False)
    groups = nanochat_param_groups(model)
    assert [g["name"] for g in groups] == ["lm_head", "embed_tokens", "matrices"]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_param_groups_clear_errors():
    model = tiny_model()
    model.model.extra_scale = nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match=r"no optimizer group .*model\.extra_scale \(3,\)"):
        nanochat_param_groups(model)
    model = tiny_model()
    model.lm_head.weight = model.model.embed_tokens.weight
    with pytest.raises(ValueError, match=r"lm_head\.weight is the same tensor as model\.embed_tokens\.weight"):
        nanochat_param_groups(model)
    model = tiny_model()
    model.model.layers[0].norm_weight = nn.Parameter(torch.ones(64))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.norm_weight \(64,\) is inside the blocks but not a matrix"):
        nanochat_param_groups(model)


def test_param_groups_through_wrappers_and_frozen_parameters():
    model = tiny_model()
    wrapper = nn.Module()
    wrapper.module = model  # what DDP looks like: names prefixed with "module."
    plain = nanochat_param_groups(model)
    wrapped = nanochat_param_groups(wrapper)
    assert [ids(g["params"]) for g in wrapped] == [ids(g["params"]) for g in plain]
    model.lm_head.weight.requires_grad_(False)
    assert "lm_head" not in [g["name"] for g in nanochat_param_groups(model)]


def test_param_groups_for_a_peft_lora_model():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_model(), peft.LoraConfig(r=4, target_modules=["q_proj", "fc1"]))
    groups = nanochat_param_groups(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert [g["name"] for g in groups] == ["matrices"]
    assert len(groups[0]["params"]) == len(trainable) == 2 * 2 * 2  # (A, B) x 2 modules x 2 layers
    opt = MuonAdamW(groups)
    x = batches(1)[0]
    model(input_ids=x, labels=x).loss.backward()
    opt.step()


def test_batch_lr_scale_and_dmodel_scale():
    assert batch_lr_scale(2**19) == 1.0
    assert batch_lr_scale(2**20) == pytest.approx(math.sqrt(2))
    assert batch_lr_scale(16384) == pytest.approx(0.1767767)  # runcpu
    with pytest.raises(ValueError, match="positive"):
        batch_lr_scale(0)
    assert dmodel_lr_scale(768) == 1.0
    assert dmodel_lr_scale(1536) == pytest.approx(0.70710678)
    # spec §6.13, d24 speedrun effective LRs (batch 2**20, base_train's CLI values)
    groups = nanochat_param_groups(tiny_model(), unembedding_lr=0.008, embedding_lr=0.3, matrix_lr=0.02,
                                   scalar_lr=0.5, batch_lr_scale=batch_lr_scale(2**20), model_dim=1536)
    lrs = {g["name"]: g["lr"] for g in groups}
    expected = {"lm_head": 0.008, "embed_tokens": 0.3, "value_embeds": 0.15, "resid_lambdas": 0.00707,
                "x0_lambdas": 0.707, "smear_backout": 0.2, "matrices": 0.0283}
    assert lrs == pytest.approx(expected, rel=2e-3)


def test_bad_groups_raise_clear_errors():
    w = nn.Parameter(torch.randn(4, 4))
    v = nn.Parameter(torch.randn(4))
    with pytest.raises(ValueError, match=r"kind='sgd'.*'adamw' or kind='muon'"):
        MuonAdamW([{"kind": "sgd", "params": [w], "lr": 0.1}])
    with pytest.raises(ValueError, match=r"kind=None.*nanochat_param_groups"):
        MuonAdamW([w])
    with pytest.raises(ValueError, match=r"Muon orthogonalizes 2-D matrices, got a 1-D parameter of shape \(4,\)"):
        MuonAdamW([{"kind": "muon", "params": [w, v], "lr": 0.1}])
    with pytest.raises(ValueError, match=r"ns_steps must be an int in \[1, 5\]"):
        MuonAdamW([{"kind": "muon", "params": [w], "lr": 0.1, "ns_steps": 6}])
    with pytest.raises(ValueError, match="missing 'lr'"):
        MuonAdamW([{"kind": "adamw", "params": [v]}])
    with pytest.raises(ValueError, match="betas"):
        MuonAdamW([{"kind": "adamw", "params": [v], "lr": 0.1, "betas": (0.9, 1.5)}])
    with pytest.raises(ValueError, match="more than one parameter group"):
        MuonAdamW([{"kind": "adamw", "params": [v], "lr": 0.1}, {"kind": "adamw", "params": [v], "lr": 0.1}])


# ---------------------------------------------------------------------------------- schedules, compile


def test_schedules_reach_the_step():
    """LambdaLR and direct edits of momentum/weight_decay take effect on the next step."""
    model = tiny_model()
    opt = MuonAdamW(nanochat_param_groups(model, weight_decay=0.1))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: [1.0, 0.0, 0.5][min(it, 2)])
    data = batches(3)
    train(model, opt, data[:1])
    sched.step()  # lr multiplier 0: nothing moves (decay is scaled by lr too)
    before = [p.detach().clone() for p in model.parameters()]
    train(model, opt, data[1:2])
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.5 * g["initial_lr"] for g in opt.param_groups])
    # momentum 0 and the same gradient twice: the update no longer depends on history
    for g in opt.param_groups:
        if g["kind"] == "muon":
            g["momentum"] = 0.0
    p = opt.param_groups[-1]["params"][0]
    x = data[2]
    model(input_ids=x, labels=x).loss.backward()
    grad = p.grad.clone()
    opt.step()
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], grad)


def test_compiled_steps_do_not_recompile_when_hyperparameters_change():
    """compile="eager" traces the fused steps with dynamo (fullgraph) without codegen: a CPU check
    of the GPU contract. Changing lr/momentum/weight decay/betas between steps adds no graph."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    torch.manual_seed(0)
    mats = [nn.Parameter(torch.randn(16, 8)) for _ in range(2)]
    vec = nn.Parameter(torch.randn(8))
    twins = [nn.Parameter(p.detach().clone()) for p in [*mats, vec]]
    groups = lambda ms, v: [{"kind": "muon", "params": ms, "lr": 0.02},  # noqa: E731
                            {"kind": "adamw", "params": [v], "lr": 0.01}]
    compiled = MuonAdamW(groups(mats, vec), compile="eager")
    eager = MuonAdamW(groups(twins[:2], twins[2]), compile=False)
    for step in range(4):
        for opt in (compiled, eager):
            opt.param_groups[0].update(lr=0.02 * (step + 1), momentum=0.85 + 0.03 * step, weight_decay=0.1 * step)
            opt.param_groups[1].update(lr=0.01 / (step + 1), betas=(0.8, 0.9 + 0.01 * step))
        for p, q in zip([*mats, vec], twins):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        compiled.step()
        eager.step()
        if step == 0:
            graphs = counters["stats"]["unique_graphs"]
            assert graphs >= 1  # the Muon step (AdamW runs torch's fused kernel, never compiled)
    assert counters["stats"]["unique_graphs"] == graphs
    for p, q in zip([*mats, vec], twins):
        torch.testing.assert_close(p, q)


# ---------------------------------------------------------------------------------- checkpoints


def test_state_dict_round_trip_gives_identical_next_steps():
    data = batches(5)
    model = tiny_model()
    opt = MuonAdamW(nanochat_param_groups(model, weight_decay=0.1))
    train(model, opt, data[:3])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    train(model, opt, data[3:])  # uninterrupted

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = tiny_model(seed=123)
    resumed.load_state_dict(saved["model"])
    opt2 = MuonAdamW(nanochat_param_groups(resumed))  # hyperparameters come from the state dict
    opt2.load_state_dict(saved["opt"])
    assert opt2.param_groups[-1]["weight_decay"] == 0.1
    train(resumed, opt2, data[3:])
    for (name, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    # the per-matrix views and the stacked buffers stay one and the same after loading
    p = opt2.param_groups[-1]["params"][0]
    assert opt2.state[p]["momentum_buffer"].data_ptr() == opt2._muon_buffers[len(opt2.param_groups) - 1][0].data_ptr()


def test_load_state_dict_rejects_mismatched_muon_state():
    w = nn.Parameter(torch.randn(8, 4))
    opt = muon_only([w], lr=0.1)
    w.grad = torch.randn(8, 4)
    opt.step()
    sd = opt.state_dict()
    sd["state"][0]["second_momentum_buffer"] = torch.zeros(1, 4)
    with pytest.raises(ValueError, match=r"second_momentum_buffer .* shape \(1, 4\), expected \(8, 1\)"):
        muon_only([nn.Parameter(torch.randn(8, 4))], lr=0.1).load_state_dict(sd)


def test_accelerate_prepare_and_save_state_resume(tmp_path):
    from accelerate import Accelerator

    def prepared(seed):
        accelerator = Accelerator(cpu=True)
        model = tiny_model(seed)
        return (accelerator, *accelerator.prepare(model, MuonAdamW(nanochat_param_groups(model))))

    def run(accelerator, model, opt, data):
        for x in data:
            accelerator.backward(model(input_ids=x, labels=x).loss)
            opt.step()
            opt.zero_grad()

    data = batches(4)
    uninterrupted = prepared(0)
    run(*uninterrupted, data)
    first = prepared(0)
    run(*first, data[:2])
    first[0].save_state(tmp_path / "ckpt")
    resumed = prepared(seed=7)
    resumed[0].load_state(tmp_path / "ckpt")
    run(*resumed, data[2:])
    for a, b in zip(uninterrupted[1].parameters(), resumed[1].parameters()):
        assert torch.equal(a, b)


def test_transformers_trainer_uses_the_factory(tmp_path):
    """TRL's SFTTrainer inherits Trainer.create_optimizer: the factory route is the same."""
    from transformers import Trainer, TrainingArguments

    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = [{"input_ids": row, "labels": row} for row in batches(1, rows=4)[0]]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                             report_to="none", use_cpu=True, save_strategy="no", logging_strategy="no",
                             lr_scheduler_type="constant")
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      optimizer_cls_and_kwargs=(MuonAdamWFactory, {"matrix_lr": 0.01, "compile": False}))
    trainer.train()
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert isinstance(opt, MuonAdamW)
    assert [g["lr"] for g in opt.param_groups if g["kind"] == "muon"] == [0.01] * 4
    changed = [n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())]
    assert "lm_head.weight" in changed and "model.layers.0.mlp.fc1.weight" in changed
    # the other route: optimizers=(optimizer, scheduler), as with SFTTrainer(optimizers=...)
    opt = MuonAdamW(nanochat_param_groups(model))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 - step / 4)
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, sched))
    trainer.train()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.5 * g["initial_lr"] for g in opt.param_groups])


@pytest.mark.gpu
def test_compiled_cuda_step_matches_eager():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device: checks the inductor-compiled fused steps against eager")
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(256, 64, device="cuda") * 0.02) for _ in range(3)]
    emb = nn.Parameter(torch.randn(1000, 64, device="cuda", dtype=torch.bfloat16))
    twins = [nn.Parameter(p.detach().clone()) for p in [*params, emb]]
    mk = lambda ms, e, c: MuonAdamW([{"kind": "muon", "params": ms, "lr": 0.02, "weight_decay": 0.1},  # noqa: E731
                                      {"kind": "adamw", "params": [e], "lr": 0.2}], compile=c)
    opts = [mk(params, emb, True), mk(twins[:3], twins[3], False)]
    for step in range(3):
        for p, q in zip([*params, emb], twins):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        for opt in opts:
            opt.param_groups[0]["lr"] = 0.02 / (step + 1)
            opt.step()
    for p, q in zip([*params, emb], twins):
        torch.testing.assert_close(p.float(), q.float(), atol=2e-2, rtol=2e-2)
