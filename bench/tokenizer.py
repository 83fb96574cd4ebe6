"""Tokenizer benchmark: training time vs rustbpe and batch-encode throughput vs tiktoken, same run, same data.

    python -m bench.tokenizer                      # Python stdlib sources as the corpus (offline)
    python -m bench.tokenizer --data DATA_DIR --chars 200_000_000 --vocab-size 32768

Goals (issue 3): training within 2x rustbpe's time on the same corpus slice; batch encoding at least as
fast as tiktoken on the same vocabulary. Both baselines are optional: a missing one is reported and skipped.
Numbers depend on the core count (both libraries encode in parallel), so compare ratios from one run only.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import sysconfig
import time

from modeling_nanochat.tokenization_nanochat import (
    SPECIAL_TOKENS,
    SPLIT_PATTERN,
    encode_texts,
    iter_training_texts,
    to_tiktoken,
    train_tokenizer,
)


def load_corpus(data: str | None, chars: int, doc_cap: int) -> list[str]:
    """Documents up to `chars` characters (cropped to `doc_cap`): parquet shards if given, else the stdlib."""
    if data:
        from training.data import iter_texts

        source = iter_texts(data, "train")
    else:
        files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "**", "*.py"), recursive=True))
        source = (open(f, encoding="utf-8", errors="replace").read() for f in files)
    return list(iter_training_texts(source, max_chars=chars, doc_cap=doc_cap))


def _best_of(n: int, fn) -> float:
    best = float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print a table (or JSON); returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m bench.tokenizer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="parquet shards, as for `nanochat tokenizer train` (default: Python stdlib sources)")
    parser.add_argument("--chars", type=int, default=20_000_000, help="corpus size in characters")
    parser.add_argument("--doc-cap", type=int, default=10_000, help="crop documents to this many characters")
    parser.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size including specials")
    parser.add_argument("--repeats", type=int, default=3, help="encode timings: best of this many runs")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)

    texts = load_corpus(args.data, args.chars, args.doc_cap)
    nchars = sum(map(len, texts))
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    results: dict = {"docs": len(texts), "chars": nchars, "vocab_size": args.vocab_size, "cpus": os.cpu_count()}
    log = print if not args.json else (lambda *a, **k: None)
    log(f"corpus: {len(texts)} docs, {nchars:,} chars; vocab {args.vocab_size}; {os.cpu_count()} CPUs")

    t0 = time.perf_counter()
    tokenizer = train_tokenizer(texts, args.vocab_size)
    results["train_s"] = time.perf_counter() - t0
    log(f"train  ours (tokenizers): {results['train_s']:.2f}s")
    try:
        import rustbpe
    except ImportError:
        log("train  rustbpe: skipped (pip install rustbpe)")
    else:
        t0 = time.perf_counter()
        rust = rustbpe.Tokenizer()
        rust.train_from_iterator(iter(texts), args.vocab_size - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
        results["train_rustbpe_s"] = time.perf_counter() - t0
        results["train_ratio"] = results["train_s"] / results["train_rustbpe_s"]
        log(f"train  rustbpe: {results['train_rustbpe_s']:.2f}s -> ours/rustbpe = {results['train_ratio']:.2f}x "
            "(goal <= 2x)")

    results["encode_s"] = _best_of(args.repeats, lambda: encode_texts(tokenizer, texts))
    results["encode_mb_s"] = nbytes / results["encode_s"] / 1e6
    log(f"encode ours: {results['encode_s']:.3f}s ({results['encode_mb_s']:.1f} MB/s)")
    try:
        enc = to_tiktoken(tokenizer)
    except ImportError:
        log("encode tiktoken: skipped (pip install tiktoken)")
    else:
        if enc.encode_ordinary_batch(texts[:200]) != encode_texts(tokenizer, texts[:200]):
            print("error: ours and tiktoken disagree on the same ranks", file=sys.stderr)
            return 1
        results["encode_tiktoken_s"] = _best_of(args.repeats, lambda: enc.encode_ordinary_batch(texts))
        results["encode_speedup"] = results["encode_tiktoken_s"] / results["encode_s"]
        log(f"encode tiktoken: {results['encode_tiktoken_s']:.3f}s -> ours is {results['encode_speedup']:.2f}x "
            "tiktoken's throughput (goal >= 1x)")
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
