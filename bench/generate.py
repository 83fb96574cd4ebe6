"""Decode throughput of NanoChat generation vs transformers' Llama and vs no cache (CPU, fp32, same run).

Four ways to produce `--new` tokens after a `--prompt`-token prompt, at batch 1 and 8, greedy:

  (a) engine     NanoChatEngine.generate: prefill once (then clone rows), pre-allocated NanoChatCache
  (b) generate   NanoChatForCausalLM.generate() with its NanoChatCache
  (c) llama      LlamaForCausalLM.generate() of the same width/depth/heads/vocab, its default DynamicCache
  (d) no cache   NanoChatForCausalLM.generate(use_cache=False): a full forward per token

Every number printed is a ratio against a baseline measured in the same process (absolute times on a
shared machine mean little). tokens/s = batch * new tokens / wall time of the whole call (prefill
included), best of `--repeats` interleaved runs. Batch 8 runs 8 different prompts; the engine also
runs its nanochat use (one prompt, 8 samples: prefill once, then clone). Peak cache bytes are the
key/value buffers held at the end of a batch-8 call. Goals (issue 4): (a), (b) >= 1.2x (c) at batch
1, >= 1.5x at batch 8, and >= 5x (d).

One torch thread by default: on a small shared CPU, two threads spin-wait on each other and make
timings of small models 10-50x worse and random.

Usage: python bench/generate.py [--depth 4] [--prompt 64] [--new 128] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch
from baselines import llama_like  # noqa: E402  (bench/ is on sys.path when a bench script runs)
from transformers import DynamicCache

from modeling_nanochat import NanoChatConfig, NanoChatForCausalLM
from modeling_nanochat.generation_nanochat import NanoChatEngine, SpecialTokens


def cache_bytes(cache) -> int:
    if hasattr(cache, "allocated_bytes"):
        return cache.allocated_bytes()
    return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers if layer.keys is not None)


def best_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=4, help="model depth (width = depth * 64)")
    parser.add_argument("--head-dim", type=int, default=64, help="attention head size")
    parser.add_argument("--vocab", type=int, default=8192, help="vocabulary size")
    parser.add_argument("--context", type=int, default=256, help="max_position_embeddings (S window: a quarter)")
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    parser.add_argument("--new", type=int, default=128, help="generated tokens")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="batch sizes")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant (best is kept)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = NanoChatConfig.from_depth(args.depth, head_dim=args.head_dim, max_seq_len=args.context,
                                       vocab_size=args.vocab, window_pattern="SSSL")
    ours = NanoChatForCausalLM(config).eval()
    llama = llama_like(config).eval()
    engine = NanoChatEngine(ours, special_tokens=SpecialTokens())  # no stop tokens: exactly --new tokens
    hf_kwargs = dict(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False, eos_token_id=None,
                     pad_token_id=0)
    print(f"NanoChat d{args.depth} (C={config.hidden_size}, windows {sorted(set(config.layer_windows))}) vs Llama; "
          f"prompt {args.prompt} + {args.new} new tokens, fp32, {args.threads} thread(s), best of {args.repeats}")
    print(f"{'batch':>5} {'variant':<30}{'tok/s':>9}{'vs llama (c)':>14}{'vs no cache (d)':>17}")
    for batch in args.batches:
        prompts = torch.randint(0, args.vocab, (batch, args.prompt))
        variants = {
            "(a) engine": lambda p=prompts: list(engine.generate(p.tolist(), max_tokens=args.new, temperature=0.0)),
            "(b) generate + NanoChatCache": lambda p=prompts: ours.generate(p, **hf_kwargs),
            "(c) llama generate": lambda p=prompts: llama.generate(p, **hf_kwargs),
        }
        if batch > 1:
            variants[f"(a) engine 1 prompt x {batch}"] = lambda p=prompts, b=batch: list(
                engine.generate(p[0].tolist(), num_samples=b, max_tokens=args.new, temperature=0.0))
        for fn in variants.values():  # warm-up
            fn()
        seconds = dict.fromkeys(variants, float("inf"))
        for _ in range(args.repeats):  # interleaved, so slow phases of a shared machine hit every variant
            for name, fn in variants.items():
                seconds[name] = min(seconds[name], best_seconds(fn, 1))
        seconds["(d) no cache"] = best_seconds(lambda p=prompts: ours.generate(p, use_cache=False, **hf_kwargs),
                                               max(1, args.repeats // 2))
        tokens = batch * args.new
        llama_tps, nocache_tps = tokens / seconds["(c) llama generate"], tokens / seconds["(d) no cache"]
        for name, secs in seconds.items():
            tps = tokens / secs
            print(f"{batch:>5} {name:<30}{tps:>9.0f}{tps / llama_tps:>13.2f}x{tps / nocache_tps:>16.2f}x")
    # peak cache bytes at the largest batch
    batch = max(args.batches)
    prompts = torch.randint(0, args.vocab, (batch, args.prompt))
    ours_cache = ours.generate(prompts, return_dict_in_generate=True, **hf_kwargs).cache
    llama_cache = llama.generate(prompts, return_dict_in_generate=True, cache=DynamicCache(config=llama.config),
                                 **hf_kwargs).cache
    ratio = cache_bytes(ours_cache) / cache_bytes(llama_cache)
    print(f"cache bytes at batch {batch}: NanoChatCache {cache_bytes(ours_cache) / 2**20:.2f} MiB, "
          f"Llama DynamicCache {cache_bytes(llama_cache) / 2**20:.2f} MiB ({ratio:.2f}x)")


if __name__ == "__main__":
    main()
