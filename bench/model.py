"""Forward+backward throughput of NanoChat vs transformers' Llama at equal matmul FLOPs (CPU, fp32, SDPA).

Both models get the same width, depth, heads and vocab; Llama's gated MLP gets intermediate size 8C/3
so that its matmul parameters equal ours (3 * 8C/3 * C == 2 * 4C * C). Every number printed is a ratio
against a baseline measured in the same process, because absolute times on shared machines mean little:

  tokens/s ratio        ours / Llama (goal >= 0.9)
  CPU MFU               (estimate_flops * tokens/s) / dense-matmul FLOP/s measured here

Usage: python bench/model.py [--depths 4 8] [--seq 256] [--batch 4] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from baselines import llama_like  # noqa: E402  (bench/ is on sys.path when a bench script runs)

from modeling_nanochat import NanoChatConfig, NanoChatForCausalLM


def matmul_flops_per_second(n: int = 1024, repeats: int = 20) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


def train_step_seconds(model, ids, repeats: int) -> float:
    model.train()
    times = []
    for i in range(repeats + 2):
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        if i >= 2:  # two warm-up steps
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 8], help="model depths to measure")
    parser.add_argument("--seq", type=int, default=256, help="sequence length")
    parser.add_argument("--batch", type=int, default=4, help="rows per step")
    parser.add_argument("--head-dim", type=int, default=64, help="head dim (width = depth * 64 rounded up)")
    parser.add_argument("--vocab", type=int, default=8192, help="vocabulary size")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per model (median reported)")
    args = parser.parse_args()
    torch.manual_seed(0)
    peak = matmul_flops_per_second()
    print(f"dense fp32 matmul here: {peak / 1e9:.1f} GFLOP/s (torch threads: {torch.get_num_threads()})")
    print(f"{'model':<28}{'tok/s ours':>12}{'tok/s llama':>13}{'ratio':>8}{'CPU MFU ours':>14}{'CPU MFU llama':>15}")
    for depth in args.depths:
        for pattern in ("L", "SSSL"):
            config = NanoChatConfig.from_depth(depth, head_dim=args.head_dim, max_seq_len=args.seq,
                                               window_pattern=pattern, vocab_size=args.vocab)
            if pattern == "SSSL":  # make the short window bite at this sequence length (a quarter of it)
                config = NanoChatConfig.from_depth(depth, head_dim=args.head_dim, max_seq_len=args.seq,
                                                   window_pattern=pattern, vocab_size=args.vocab,
                                                   short_window=args.seq // 4)
            ours = NanoChatForCausalLM(config)
            llama = llama_like(config)
            ours_matmul = ours.estimate_flops() - sum(
                12 * config.num_attention_heads * config.head_dim * min(w, args.seq) for w in config.layer_windows)
            llama_params = sum(p.numel() for p in llama.parameters()) - llama.model.embed_tokens.weight.numel()
            ids = torch.randint(0, args.vocab, (args.batch, args.seq))
            tokens = args.batch * args.seq
            t_ours = train_step_seconds(ours, ids, args.repeats)
            t_llama = train_step_seconds(llama, ids, args.repeats)
            tps_ours, tps_llama = tokens / t_ours, tokens / t_llama
            llama_flops = 6 * llama_params + 12 * config.num_hidden_layers * config.hidden_size * args.seq
            mfu_ours = ours.estimate_flops() * tps_ours / peak
            mfu_llama = llama_flops * tps_llama / peak
            name = f"d{depth} C={config.hidden_size} {pattern}"
            print(f"{name:<28}{tps_ours:>12.0f}{tps_llama:>13.0f}{tps_ours / tps_llama:>8.2f}"
                  f"{mfu_ours:>14.1%}{mfu_llama:>15.1%}   (matmul FLOPs/token ours/llama: "
                  f"{ours_matmul / (6 * llama_params):.3f})")


if __name__ == "__main__":
    main()
