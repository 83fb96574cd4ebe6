"""Serving throughput and latency: continuous batching vs one request at a time (CPU, tiny model, same run).

Two `nanochat serve` processes on the same random d4-sized model (256 wide, 4 layers, 512-token context):

  batched     --max-batch 16: concurrent requests share one decode loop (rows join/leave between steps)
  baseline    --max-batch 1:  one request at a time, the others wait in the queue (nanochat's chat_web)

For 1, 4 and 16 concurrent streaming clients (OpenAI `/v1/chat/completions`, greedy, `--new` tokens each,
every client sending `--rounds` requests back to back), it reports aggregate generated tokens/s (usage
tokens of all requests / wall time) and p50/p95 time to first token (request sent -> first content
chunk), and the ratios batched/baseline measured in this run. Goals (issue 11): >= 3x aggregate
throughput at 16 clients, and p95 TTFT at 4 clients <= 2x the single-client TTFT (batched server).

The clients (httpx, asyncio) run in this process, each server in its own with one torch thread (on a
small shared CPU two threads spin-wait on each other). The last line printed is a JSON summary.

Usage: python bench/serve.py [--new 48] [--rounds 2] [--clients 1,4,16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

REPO = Path(__file__).resolve().parent.parent
CORPUS = ("The quick brown fox jumps over the lazy dog. A small model reads text and writes text. " * 40
          + "Numbers 0 1 2 3 4 5 6 7 8 9 and questions: what, why, how? " * 20)


def build_model(folder: Path) -> None:
    """A random NanoChat (every feature on) and a BPE tokenizer: generation cost is all that matters here."""
    sys.path.insert(0, str(REPO))
    from modeling_nanochat import NanoChatConfig, NanoChatForCausalLM
    from modeling_nanochat.tokenization_nanochat import train_tokenizer

    tokenizer = train_tokenizer([CORPUS], vocab_size=512)
    torch.manual_seed(0)
    config = NanoChatConfig(vocab_size=len(tokenizer), hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                            max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id)
    NanoChatForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, folder: Path, max_batch: int):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", str(folder), "--port", str(self.port), "--max-batch",
             str(max_batch), "--max-queue", "256", "--no-ui", "--log-level", "warning"],
            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    def __enter__(self) -> Server:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.2)
            if self.proc.poll() is not None:
                break
        raise RuntimeError("the server did not start")

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def one_request(client: httpx.AsyncClient, url: str, prompt: str, new: int) -> tuple[float, int]:
    """(time to first content chunk, completion tokens) of one streamed chat completion."""
    body = {"model": "bench", "messages": [{"role": "user", "content": prompt}], "temperature": 0, "max_tokens": new,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif ttft is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                ttft = time.perf_counter() - start
    return (ttft if ttft is not None else time.perf_counter() - start), tokens


async def scenario(url: str, clients: int, rounds: int, new: int) -> dict:
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=64)) as client:
        async def user(i: int):
            return [await one_request(client, url, f"Request {i}.{r}: tell me about the quick brown fox", new)
                    for r in range(rounds)]

        await one_request(client, url, "warm up", 4)
        start = time.perf_counter()
        results = [x for per_user in await asyncio.gather(*[user(i) for i in range(clients)]) for x in per_user]
        wall = time.perf_counter() - start
    ttfts = sorted(t for t, _ in results)
    tokens = sum(n for _, n in results)
    p95 = ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))]
    return {"clients": clients, "requests": len(results), "tokens": tokens, "tok_s": tokens / wall,
            "ttft_p50": statistics.median(ttfts), "ttft_p95": p95}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new", type=int, default=48, help="max new tokens per request (greedy)")
    parser.add_argument("--rounds", type=int, default=2, help="requests each client sends back to back")
    parser.add_argument("--clients", default="1,4,16", help="comma-separated concurrency levels")
    args = parser.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    results: dict[str, dict[int, dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "bench-model"
        build_model(folder)
        for name, max_batch in (("batched", 16), ("baseline", 1)):
            with Server(folder, max_batch) as server:
                results[name] = {c: asyncio.run(scenario(server.url, c, args.rounds, args.new)) for c in levels}
    print(f"\nserving bench: random 256-wide 4-layer NanoChat, CPU, greedy, {args.new} new tokens, "
          f"{args.rounds} requests per client (batched = --max-batch 16, baseline = --max-batch 1)")
    print(f"{'clients':>7} | {'batched tok/s':>13} {'p50 TTFT':>9} {'p95 TTFT':>9} | {'baseline tok/s':>14} "
          f"{'p50 TTFT':>9} {'p95 TTFT':>9} | {'throughput x':>12}")
    for c in levels:
        b, s = results["batched"][c], results["baseline"][c]
        print(f"{c:>7} | {b['tok_s']:>13.1f} {b['ttft_p50']:>8.3f}s {b['ttft_p95']:>8.3f}s | {s['tok_s']:>14.1f} "
              f"{s['ttft_p50']:>8.3f}s {s['ttft_p95']:>8.3f}s | {b['tok_s'] / s['tok_s']:>11.2f}x")
    top, mid = max(levels), (4 if 4 in levels else levels[len(levels) // 2])
    speedup = results["batched"][top]["tok_s"] / results["baseline"][top]["tok_s"]
    single = results["batched"][min(levels)]["ttft_p50"]
    ttft_ratio = results["batched"][mid]["ttft_p95"] / single
    print(f"\nthroughput at {top} clients: {speedup:.2f}x the one-at-a-time baseline (goal >= 3x: "
          f"{'met' if speedup >= 3 else 'NOT met'})")
    print(f"p95 TTFT at {mid} clients: {ttft_ratio:.2f}x the single-client TTFT (goal <= 2x: "
          f"{'met' if ttft_ratio <= 2 else 'NOT met'})")
    print(json.dumps({"throughput_speedup": round(speedup, 3), "ttft_p95_ratio": round(ttft_ratio, 3),
                      "results": {k: list(v.values()) for k, v in results.items()}}))


if __name__ == "__main__":
    main()
