"""MuonAdamW across 2 gloo ranks == 1 process on the same global batch.

pytest runs the 1-process reference, then launches this same file under torchrun with 2 CPU
processes (`ACCELERATE_USE_CPU=1`, as Accelerate needs on CPU). The workers train with
Accelerate's DDP (gradients averaged by DDP, Muon work split across ranks) and in `grad_sync`
mode (no DDP; the optimizer reduce-scatters gradients itself), and under FSDP2 (`fully_shard`:
DTensor parameters, rows exchanged by all-to-all), and check checkpoint resume across world sizes
(FSDP2 through torch.distributed.checkpoint's state-dict API, as Accelerate saves it). Rank 0
writes what it saw; the test compares.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
GLOBAL_ROWS, STEPS = 4, 3


def tiny_model(seed: int = 0) -> torch.nn.Module:
    from modeling_nanochat import NanoChatConfig, NanoChatForCausalLM

    torch.manual_seed(seed)
    config = NanoChatConfig.from_depth(3, aspect_ratio=16, head_dim=16, vocab_size=200, max_seq_len=32)
    model = NanoChatForCausalLM(config)
    # nanochat's init zeroes the block outputs, which leaves the scalars' first gradients at
    # rounding-noise level (~1e-10), where Adam's sign-like first step amplifies summation-order
    # differences; perturb every weight so all gradients carry signal.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def global_batches() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 200, (GLOBAL_ROWS, 12), generator=gen) for _ in range(STEPS + 1)]


def make_optimizer(model: torch.nn.Module, **kwargs):
    from training.muon import MuonAdamW, nanochat_param_groups

    return MuonAdamW(nanochat_param_groups(model, weight_decay=0.2, embedding_lr=0.05, matrix_lr=0.03), **kwargs)


def step(model, opt, x, backward=None) -> None:
    loss = model(input_ids=x, labels=x).loss
    (backward or torch.Tensor.backward)(loss)
    opt.step()
    opt.zero_grad(set_to_none=True)


def params_of(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# ---------------------------------------------------------------------------------- worker

try:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    FULL = StateDictOptions(full_state_dict=True)
except ImportError:  # torch without distributed
    pass


def fully_sharded(model):
    """FSDP2 on the CPU mesh of all ranks: each decoder layer, then the root; then the optimizer."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, make_optimizer(model)



def worker(outdir: Path) -> None:
    import io

    import torch.distributed as dist
    from accelerate import Accelerator

    accelerator = Accelerator()
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2, world
    rows = slice(rank * GLOBAL_ROWS // world, (rank + 1) * GLOBAL_ROWS // world)
    data = [x[rows] for x in global_batches()]
    out: dict = {}

    # 1. Accelerate DDP: gradients arrive averaged; each rank orthogonalizes its share.
    model = tiny_model()
    opt = make_optimizer(model)
    ddp_model, ddp_opt = accelerator.prepare(model, opt)
    for x in data[:STEPS]:
        step(ddp_model, ddp_opt, x, accelerator.backward)
    muon = [p for g in opt.param_groups if g["kind"] == "muon" for p in g["params"]]
    out["ddp_owned"] = sum("momentum_buffer" in opt.state.get(p, {}) for p in muon), len(muon)
    out["ddp_params"] = params_of(accelerator.unwrap_model(ddp_model))
    out["ddp_state"] = ddp_opt.state_dict()  # collective, full

    # 2. No DDP wrapper; the optimizer averages gradients itself.
    model = tiny_model()
    opt = make_optimizer(model, grad_sync=True)
    for x in data[:STEPS]:
        step(model, opt, x)
    out["sync_params"] = params_of(model)
    # resume from our own (2-rank) checkpoint: bitwise the same next step
    checkpoint = io.BytesIO()
    torch.save(opt.state_dict(), checkpoint)  # collective: every rank calls state_dict()
    checkpoint.seek(0)
    twin = copy.deepcopy(model)
    twin_opt = make_optimizer(twin, grad_sync=True)
    twin_opt.load_state_dict(torch.load(checkpoint, weights_only=True))
    step(model, opt, data[STEPS])
    step(twin, twin_opt, data[STEPS])
    out["resume_2rank_bitwise"] = all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))

    # 3. Resume the 1-process reference's checkpoint on 2 ranks and take step 4.
    ref = torch.load(outdir / "reference_step3.pt", weights_only=True)
    model = tiny_model()
    model.load_state_dict(ref["model"])
    opt = make_optimizer(model, grad_sync=True)
    opt.load_state_dict(ref["optimizer"])
    step(model, opt, data[STEPS])
    out["from_1rank_step4"] = params_of(model)

    # 4. FSDP2: every decoder layer and the root sharded by rows; gradients averaged by FSDP.
    fsdp_model, fsdp_opt = fully_sharded(tiny_model())
    for x in data[:STEPS]:
        step(fsdp_model, fsdp_opt, x)
    out["fsdp_sharded"] = all(p.to_local().shape[0] < p.shape[0] for p in fsdp_model.parameters() if p.shape[0] > 1)
    out["fsdp_params"] = [p.full_tensor() for p in fsdp_model.parameters()]
    out["fsdp_state"] = get_optimizer_state_dict(fsdp_model, fsdp_opt, options=FULL)  # collective
    # resume the 1-process reference's step-3 state (FQN-keyed, full) into a sharded run
    model = tiny_model()
    model.load_state_dict(ref["model"])
    fsdp_model, fsdp_opt = fully_sharded(model)
    set_optimizer_state_dict(fsdp_model, fsdp_opt, ref["optimizer_fqn"], options=FULL)
    step(fsdp_model, fsdp_opt, data[STEPS])
    out["fsdp_from_1rank_step4"] = [p.full_tensor() for p in fsdp_model.parameters()]
    # as Accelerate does it: optimizer built and loaded on the plain model, which is sharded afterwards
    # and its new DTensor parameters put into the optimizer's groups (the state must follow them)
    ref = torch.load(outdir / "reference_step3.pt", weights_only=True)  # afresh: loading shares tensors, steps mutate
    model = tiny_model()
    model.load_state_dict(ref["model"])
    opt = make_optimizer(model, distributed=False)
    opt.load_state_dict(ref["optimizer"])
    before = list(model.parameters())
    fsdp_model, _ = fully_sharded(model)
    after = dict(zip(map(id, before), fsdp_model.parameters()))
    for group in opt.param_groups:
        group["params"] = [after[id(p)] for p in group["params"]]
    step(fsdp_model, opt, data[STEPS])
    out["fsdp_swapped_step4"] = [p.full_tensor() for p in fsdp_model.parameters()]

    if rank == 0:
        torch.save(out, outdir / "rank0.pt")
    dist.barrier()


# ---------------------------------------------------------------------------------- test


def test_two_gloo_ranks_match_one_process(tmp_path):
    data = global_batches()
    model = tiny_model()
    opt = make_optimizer(model)
    for x in data[:STEPS]:
        step(model, opt, x)
    step3, state3 = params_of(model), copy.deepcopy(opt.state_dict())  # state_dict() holds live references
    state3_fqn = copy.deepcopy(get_optimizer_state_dict(model, opt, options=FULL))  # keyed by parameter name
    torch.save({"model": model.state_dict(), "optimizer": state3, "optimizer_fqn": state3_fqn},
               tmp_path / "reference_step3.pt")
    step(model, opt, data[STEPS])
    step4 = params_of(model)

    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           __file__, str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    out = torch.load(tmp_path / "rank0.pt", weights_only=True)

    names = [n for n, _ in model.named_parameters()]
    close = dict(atol=2e-5, rtol=1e-4)
    owned, total = out["ddp_owned"]
    assert 0 < owned < total  # rank 0 kept Muon state only for its share of the matrices
    for name, ours, ref in zip(names, out["ddp_params"], step3):
        torch.testing.assert_close(ours, ref, **close, msg=lambda s, n=name: f"DDP {n}: {s}")
    for name, ours, ref in zip(names, out["sync_params"], step3):
        torch.testing.assert_close(ours, ref, **close, msg=lambda s, n=name: f"grad_sync {n}: {s}")
    for name, ours, ref in zip(names, out["from_1rank_step4"], step4):
        torch.testing.assert_close(ours, ref, **close, msg=lambda s, n=name: f"resumed {n}: {s}")
    assert out["resume_2rank_bitwise"]
    assert out["fsdp_sharded"]  # FSDP2 really split the rows (every parameter with more than one row)
    for name, ours, ref in zip(names, out["fsdp_params"], step3):
        torch.testing.assert_close(ours, ref, **close, msg=lambda s, n=name: f"FSDP2 {n}: {s}")
    for name, ours, ref in zip(names, out["fsdp_from_1rank_step4"], step4):
        torch.testing.assert_close(ours, ref, **close, msg=lambda s, n=name: f"FSDP2 resumed {n}: {s}")
    for name, ours, ref in zip(names, out["fsdp_swapped_step4"], step4):  # Muon state re-owned across 1 -> 2 ranks
        torch.testing.assert_close(ours, ref, **close, msg=lambda s, n=name: f"FSDP2 after the swap {n}: {s}")
    # the FSDP2 run's full (gathered) optimizer state == the 1-process state, parameter by parameter
    fsdp_state = out["fsdp_state"]["state"]
    assert fsdp_state.keys() == state3_fqn["state"].keys()
    for name, entry in state3_fqn["state"].items():
        assert fsdp_state[name].keys() == entry.keys(), name
        for key, value in entry.items():
            torch.testing.assert_close(fsdp_state[name][key], value, **close, msg=lambda s, n=name, k=key: f"{n} {k}: {s}")
    # the gathered (full) state of 2 ranks == the 1-process state, key by key
    assert out["ddp_state"]["state"].keys() == state3["state"].keys()
    for index, entry in state3["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                torch.testing.assert_close(out["ddp_state"]["state"][index][key], value, **close)
            else:
                assert out["ddp_state"]["state"][index][key] == value


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
