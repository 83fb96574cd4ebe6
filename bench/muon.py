"""MuonAdamW (training/muon.py) against baselines measured in the same run (CPU, fp32).

  1. optimizer step time on the real d4/d8 parameter sets (vocab 32768), ours vs
     torch.optim.Muon (matrices) + torch.optim.AdamW(fused=True) (the rest; ours uses the same fused
     AdamW kernel, so the ratio is about the Muon part). Goal: ours <= 1.2x, although ours
     does more per step (MuonEq, Muon+, NorMuon, cautious decay). torch's Muon always
     orthogonalizes in bf16, ours in fp32 on CPU (bf16 on GPU): both are shown.
  2. the Muon part alone: one stacked kernel per shape group vs the same kernel per matrix.
  3. 2 gloo ranks (torchrun, 1 thread each): step time per rank vs 1 rank on the same matrices.
     Goal ~0.5x: each rank orthogonalizes half of every shape group, then all-gathers. The same
     under FSDP2 (matrices row-sharded with fully_shard; rows to owners and back by all-to-all).
  4. sanity: validation loss after the same number of steps on a small synthetic LM task (a
     Markov chain whose second half repeats the first, so attention must learn to copy), ours
     vs AdamW, each with a 3-point learning-rate sweep (ours: nanochat's LRs times 1, 2, 4).

Usage: python bench/muon.py [--depths 4 8] [--repeats 3] [--loss-steps 200] [--no-ranks] [--no-loss]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from modeling_nanochat import NanoChatConfig, NanoChatForCausalLM
from training.muon import MuonAdamW, muon_update_, nanochat_param_groups

REPO = Path(__file__).resolve().parents[1]


def parameter_set(depth: int, vocab: int = 32768) -> nn.Module:
    """The real model's parameters (shapes, names) with random values and random gradients."""
    config = NanoChatConfig.from_depth(depth, vocab_size=vocab)
    with torch.device("meta"):
        model = NanoChatForCausalLM(config)
    model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    return model


def is_matrix(name: str, p: torch.Tensor) -> bool:
    return ".layers." in name and p.ndim == 2


def baseline(model: nn.Module) -> list[torch.optim.Optimizer]:
    named = list(model.named_parameters())
    return [
        torch.optim.Muon([p for n, p in named if is_matrix(n, p)], lr=0.02, momentum=0.95, nesterov=True,
                         weight_decay=0.0, adjust_lr_fn="original"),
        torch.optim.AdamW([p for n, p in named if not is_matrix(n, p)], lr=0.004, betas=(0.8, 0.95), eps=1e-10,
                          weight_decay=0.0, fused=True),
    ]


def median_step_seconds(candidates: dict[str, list], repeats: int) -> dict[str, float]:
    """Interleave the candidates (each a list of optimizers stepped together) so drift hits all."""
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for i in range(repeats + 1):
        for name, opts in candidates.items():
            t0 = time.perf_counter()
            for opt in opts:
                opt.step()
            if i > 0:  # first round: state allocation, warm-up
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def stacked_vs_loop(model: nn.Module, repeats: int) -> tuple[float, float]:
    """Seconds for all Muon shape groups: one stacked call per group vs one call per matrix."""
    opt = MuonAdamW(nanochat_param_groups(model), compile=False)
    groups = [g["params"] for g in opt.param_groups if g["kind"] == "muon"]
    scalars = [torch.tensor(v) for v in (0.95, 0.02, 0.0, 0.9)]

    @torch.no_grad()
    def run(chunks: list[list[torch.Tensor]]) -> None:
        for ps in chunks:
            m, n = ps[0].shape
            second = torch.zeros(len(ps), m, 1) if m >= n else torch.zeros(len(ps), 1, n)
            stacked = torch.stack(ps)
            muon_update_(stacked, torch.stack([p.grad for p in ps]), torch.zeros_like(stacked), second,
                         *scalars, 5, torch.float32)
            torch._foreach_copy_(ps, list(stacked.unbind(0)))

    per_matrix = [[p] for ps in groups for p in ps]
    times: dict[str, list[float]] = {"stacked": [], "loop": []}
    for i in range(repeats + 1):
        for name, chunks in (("stacked", groups), ("loop", per_matrix)):
            t0 = time.perf_counter()
            run(chunks)
            if i > 0:
                times[name].append(time.perf_counter() - t0)
    return statistics.median(times["stacked"]), statistics.median(times["loop"])


def rank_worker(depth: int, repeats: int) -> None:
    """Under torchrun: time the Muon groups split across ranks vs all on this rank."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    model = parameter_set(depth, vocab=256)  # only the matrices are timed
    groups = [g for g in nanochat_param_groups(model) if g["kind"] == "muon"]
    split = MuonAdamW(groups, compile=False)
    alone = MuonAdamW(groups, compile=False, distributed=False)
    fsdp = MuonAdamW([g for g in nanochat_param_groups(fully_sharded(depth)) if g["kind"] == "muon"], compile=False)
    times: dict[str, list[float]] = {"split": [], "alone": [], "fsdp": []}
    for i in range(repeats + 1):
        for name, opt in (("split", split), ("alone", alone), ("fsdp", fsdp)):
            dist.barrier()
            t0 = time.perf_counter()
            opt.step()
            if i > 0:
                times[name].append(time.perf_counter() - t0)
    result = {k: statistics.median(v) for k, v in times.items()}
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(result), flush=True)
    dist.destroy_process_group()


def fully_sharded(depth: int) -> nn.Module:
    """parameter_set(depth) with every decoder layer and the root under FSDP2, random DTensor gradients."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    model = parameter_set(depth, vocab=256)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for p in model.parameters():
        local = torch.randn_like(p.to_local()) * 1e-3
        p.grad = DTensor.from_local(local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
    return model


def two_ranks(depth: int, repeats: int) -> dict[str, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           __file__, "--rank-worker", "--depths", str(depth), "--repeats", str(repeats)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"2-rank run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(line[len("RESULT "):])


def copy_task_batches(steps: int, batch: int, seq: int, vocab: int, seed: int) -> list[torch.Tensor]:
    """First half: a Markov chain where each token has 4 likely successors (90%) or a uniform one;
    second half: the first half again (predictable only by attending back and copying)."""
    gen = torch.Generator().manual_seed(1234)
    successors = torch.randint(0, vocab, (vocab, 4), generator=gen)
    gen.manual_seed(seed)
    out = []
    for _ in range(steps):
        x = torch.empty(batch, seq // 2, dtype=torch.long)
        x[:, 0] = torch.randint(0, vocab, (batch,), generator=gen)
        for t in range(1, seq // 2):
            follow = successors[x[:, t - 1], torch.randint(0, 4, (batch,), generator=gen)]
            noise = torch.randint(0, vocab, (batch,), generator=gen)
            x[:, t] = torch.where(torch.rand(batch, generator=gen) < 0.9, follow, noise)
        out.append(torch.cat([x, x], dim=1))
    return out


def final_loss(make_optimizer, train: list[torch.Tensor], val: list[torch.Tensor]) -> float:
    torch.manual_seed(0)
    model = NanoChatForCausalLM(NanoChatConfig.from_depth(4, aspect_ratio=32, head_dim=32, vocab_size=512,
                                                          max_seq_len=64))
    opt = make_optimizer(model)
    for x in train:
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        losses = [model(input_ids=x, labels=x).loss.item() for x in val]
    return sum(losses) / len(losses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 8], help="parameter sets to time")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per candidate (median)")
    parser.add_argument("--loss-steps", type=int, default=200, help="training steps of the loss sanity check")
    parser.add_argument("--no-ranks", action="store_true", help="skip the 2-rank timing")
    parser.add_argument("--no-loss", action="store_true", help="skip the loss sanity check")
    parser.add_argument("--rank-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_worker:
        rank_worker(args.depths[0], args.repeats)
        return

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU fp32")
    for depth in args.depths:
        model = parameter_set(depth)
        n_params = sum(p.numel() for p in model.parameters())
        t = median_step_seconds({
            "torch Muon+AdamW": baseline(model),
            "ours": [MuonAdamW(nanochat_param_groups(model))],
            "ours bf16 polar": [MuonAdamW(nanochat_param_groups(model), polar_dtype=torch.bfloat16)],
        }, args.repeats)
        base = t["torch Muon+AdamW"]
        print(f"d{depth} ({n_params / 1e6:.0f}M params) optimizer step: torch Muon+AdamW {base * 1e3:.0f} ms | "
              f"ours {t['ours'] * 1e3:.0f} ms = {t['ours'] / base:.2f}x (goal <= 1.2x) | "
              f"ours with bf16 polar {t['ours bf16 polar'] * 1e3:.0f} ms = {t['ours bf16 polar'] / base:.2f}x")
        stacked, loop = stacked_vs_loop(model, args.repeats)
        print(f"d{depth} Muon groups: stacked {stacked * 1e3:.0f} ms vs per-matrix loop {loop * 1e3:.0f} ms "
              f"= {stacked / loop:.2f}x")
        del model
    if not args.no_ranks:
        depth = args.depths[0]
        r = two_ranks(depth, args.repeats)
        print(f"d{depth} Muon step, 2 gloo ranks x 1 thread: per rank {r['split'] * 1e3:.0f} ms vs one rank doing "
              f"all {r['alone'] * 1e3:.0f} ms = {r['split'] / r['alone']:.2f}x (goal ~0.5x, incl. all-gather); "
              f"FSDP2 row shards {r['fsdp'] * 1e3:.0f} ms = {r['fsdp'] / r['alone']:.2f}x (incl. 2 all-to-alls)")
    if not args.no_loss:
        train = copy_task_batches(args.loss_steps, 16, 64, 512, seed=0)
        val = copy_task_batches(8, 16, 64, 512, seed=1)

        def ours(mult: float):
            return lambda m: MuonAdamW(nanochat_param_groups(
                m, unembedding_lr=0.008 * mult, embedding_lr=0.3 * mult, matrix_lr=0.02 * mult, scalar_lr=0.5 * mult))

        def adamw(lr: float):
            return lambda m: torch.optim.AdamW(m.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)

        runs = {f"ours x{k:g}": final_loss(ours(k), train, val) for k in (1, 2, 4)}
        runs.update({f"AdamW {lr:g}": final_loss(adamw(lr), train, val) for lr in (3e-3, 1e-2, 3e-2)})
        best_ours = min((v, k) for k, v in runs.items() if k.startswith("ours"))
        best_adamw = min((v, k) for k, v in runs.items() if k.startswith("AdamW"))
        print(f"synthetic copy task (d4, C=128, vocab 512, {args.loss_steps} steps of 16x64 tokens), val loss: "
              f"best ours {best_ours[0]:.3f} ({best_ours[1]}) vs best AdamW {best_adamw[0]:.3f} ({best_adamw[1]}); "
              + ", ".join(f"{k}: {v:.3f}" for k, v in runs.items()) + f"; uniform {math.log(512):.3f}")

if __name__ == "__main__":
    main()
