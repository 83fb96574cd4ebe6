"""Pretraining throughput: our Accelerate loop vs a minimal hand-written loop, and the data loader's headroom.

Same model (d4 by default), same optimizer (MuonAdamW with nanochat's groups), same batches; measured in
one process on the embedded corpus, so only ratios are printed as results:

  loop overhead        median step time of training.pretrain / minimal loop   (goal <= 1.05)
  loader headroom      data-loader tokens/s / tokens/s the training consumes   (goal >= 20x at d4)
  cropped fraction     share of document tokens thrown away by best-fit cropping

Usage: python bench/pretrain.py [--depth 4] [--seq 256] [--batch 8] [--steps 12]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=4, help="model depth")
    parser.add_argument("--seq", type=int, default=256, help="sequence length")
    parser.add_argument("--batch", type=int, default=8, help="rows per step")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per loop (first 2 are warm-up)")
    parser.add_argument("--vocab", type=int, default=4096, help="tokenizer size")
    args = parser.parse_args()

    from modeling_nanochat import NanoChatForCausalLM
    from modeling_nanochat.tokenization_nanochat import encode_texts, train_tokenizer
    from training import pretrain as P
    from training.data import build_pretrain_loader, iter_texts, prepare_embedded_corpus
    from training.muon import MuonAdamW, nanochat_param_groups

    root = Path(tempfile.mkdtemp(prefix="bench-pretrain-"))
    prepare_embedded_corpus(root / "data", num_shards=4)
    tokenizer = train_tokenizer(iter_texts(str(root / "data"), "train", max_chars=2_000_000), vocab_size=args.vocab)
    tokenizer.save_pretrained(root / "tok")
    bos = tokenizer.convert_tokens_to_ids("<|bos|>")
    tokenize = lambda texts: encode_texts(tokenizer, texts)  # noqa: E731

    # 1. the data loader alone
    loader = build_pretrain_loader(str(root / "data"), tokenize, bos, args.batch, args.seq)
    next(loader)
    t0 = time.perf_counter()
    n_batches = 40
    for _ in range(n_batches):
        next(loader)
    loader_tps = n_batches * args.batch * args.seq / (time.perf_counter() - t0)
    packer = loader.packer
    cropped = packer.tokens_cropped / max(packer.tokens_read, 1)

    # 2. our loop (Accelerate, schedules, logging, loader) through training.pretrain.run
    cfg = P.PretrainConfig(
        data=str(root / "data"), tokenizer=str(root / "tok"), output_dir=str(root / "run"), depth=args.depth,
        head_dim=64, max_seq_len=args.seq, device_batch_size=args.batch, total_batch_size=args.batch * args.seq,
        num_iterations=args.steps, eval_every=-1, eval_tokens=args.batch * args.seq, sample_every=10**9,
        core_metric_every=-1,
        log_every=10**9,
    )
    summary = P.run(cfg)
    ours = statistics.median(h["dt"] for h in summary["history"] if "dt" in h and h["step"] > 2)

    # 3. a minimal loop: same model init, optimizer and batches, nothing else
    torch.manual_seed(cfg.seed)
    config = P.model_config(cfg, len(tokenizer))
    model = NanoChatForCausalLM(config).train()
    optimizer = MuonAdamW(nanochat_param_groups(model, batch_lr_scale=summary["plan"]["batch_lr_scale"]))
    loader = build_pretrain_loader(str(root / "data"), tokenize, bos, args.batch, args.seq)
    times = []
    for step in range(args.steps):
        t0 = time.perf_counter()
        inputs, targets = next(loader)
        model(input_ids=inputs, targets=targets, use_cache=False).loss.backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)
        if step >= 2:
            times.append(time.perf_counter() - t0)
    minimal = statistics.median(times)
    train_tps = args.batch * args.seq / ours
    print(f"d{args.depth}, seq {args.seq}, batch {args.batch}, {torch.get_num_threads()} threads")
    print(f"step time: training.pretrain {ours * 1000:.1f} ms, minimal loop {minimal * 1000:.1f} ms")
    print(f"loop overhead (ours / minimal):            {ours / minimal:.3f}   (goal <= 1.05)")
    print(f"loader headroom (loader / training tok/s): {loader_tps / train_tps:.1f}x  "
          f"({loader_tps:,.0f} vs {train_tps:,.0f} tok/s; goal >= 20x)")
    print(f"cropped fraction of document tokens:       {cropped:.1%}")


if __name__ == "__main__":
    main()
