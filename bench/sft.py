"""SFT throughput: best-fit packing (padding-free rows) vs padded batches, measured in the same run (CPU, fp32).

Both arms are the real `nanochat sft` trainer (training.sft.build_trainer: TRL's SFTTrainer, assistant-only
loss, MuonAdamW) on the same model and the same conversations (the first N of the offline `demo` mixture):

  - packed:  `packing=True` (TRL's best-fit decreasing): each micro-batch is one padding-free row of
             device_batch_size x max_length tokens, conversations kept apart by position_ids;
  - padded:  `packing=False, padding_free=False`: each micro-batch is device_batch_size x k conversations
             (k chosen so both arms hold about the same number of *real* tokens per micro-batch) padded to the
             longest one, with an attention mask (TRL's default collator).

The metric is supervised tokens (labels != -100) per second of optimizer steps (forward, backward, Muon step),
after warm-up steps, from the median step time (the arms are interleaved step by step, so load from other jobs
on a shared machine hits both). Goal: packed / padded >= 1.5x.

Usage: python bench/sft.py [--depth 4] [--conversations 1200] [--steps 12] [--max-length 512] [--batch 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_base(root: Path, depth: int, max_length: int, batch: int, vocab: int) -> Path:
    """A fresh NanoChat of the given depth with a tokenizer trained on the demo mixture's text."""
    from modeling_nanochat import NanoChatConfig, NanoChatForCausalLM
    from modeling_nanochat.tokenization_nanochat import train_tokenizer
    from training.tasks import load_mixture, preset

    train, _ = preset("demo")
    texts = [" ".join(p["text"] for m in row["messages"] for p in m["content"]) for row in load_mixture(train)]
    tokenizer = train_tokenizer(texts, vocab)
    special = {"bos_token_id": tokenizer.convert_tokens_to_ids("<|bos|>"),
               "eos_token_id": tokenizer.convert_tokens_to_ids("<|assistant_end|>")}
    config = NanoChatConfig.from_depth(depth, head_dim=64, max_seq_len=max_length, vocab_size=len(tokenizer),
                                       pad_token_id=special["bos_token_id"], **special)
    torch.manual_seed(0)
    NanoChatForCausalLM(config).save_pretrained(root)
    tokenizer.save_pretrained(root)
    (root / "summary.json").write_text(json.dumps({"config": {
        "max_seq_len": max_length, "device_batch_size": batch, "total_batch_size": batch * max_length,
        "embedding_lr": 0.3, "unembedding_lr": 0.008, "matrix_lr": 0.02}}))
    return root


class Arm:
    """One configuration's trainer, its optimizer and an endless stream of its micro-batches."""

    def __init__(self, trainer, total_steps: int):
        self.trainer, self.model = trainer, trainer.model.train()
        trainer.create_optimizer_and_scheduler(num_training_steps=total_steps)
        self.batches = iter(trainer.get_train_dataloader())
        self.times, self.supervised, self.slots, self.real = [], 0, 0, 0

    def step(self, record: bool) -> None:
        """One optimizer step on one micro-batch (forward, backward, MuonAdamW), timed."""
        inputs = next(self.batches)
        t0 = time.perf_counter()
        loss = self.trainer.compute_loss(self.model, inputs)
        loss.backward()
        self.trainer.optimizer.step()
        self.trainer.optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        if record:
            self.times.append(dt)
            self.supervised += int((inputs["labels"] != -100).sum())
            self.slots += inputs["input_ids"].numel()
            self.real += int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else inputs["input_ids"].numel()

    def summary(self) -> dict[str, float]:
        n = len(self.times)
        # median step time: robust to the other jobs of a shared machine (the mean-based figure is printed too)
        median = statistics.median(self.times)
        return {"sup_tok_per_s": self.supervised / n / median, "sup_tok_per_s_mean": self.supervised / sum(self.times),
                "step_s": median, "supervised_per_step": self.supervised / n, "padding_frac": 1 - self.real / self.slots}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--conversations", type=int, default=1200)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2, help="packed rows per micro-batch")
    parser.add_argument("--vocab", type=int, default=4096)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    from training import sft as S
    from training.tasks import load_mixture, preset

    train_specs, _ = preset("demo")
    data = load_mixture(train_specs).select(range(args.conversations)).select_columns(["messages"])
    with tempfile.TemporaryDirectory() as tmp:
        base = make_base(Path(tmp) / "base", args.depth, args.max_length, args.batch, args.vocab)
        common = dict(base=str(base), output_dir=str(Path(tmp) / "out"), eval_strategy="no", use_cpu=True,
                      disable_tqdm=True, seed=0, dataloader_drop_last=True)
        packed_trainer = S.build_trainer(S.NanoChatSFTConfig(**common), data)
        stats = packed_trainer.supervision["train"]
        mean_len = stats["tokens"] / stats["examples"]
        per_row = args.max_length / mean_len
        padded_batch = max(1, round(args.batch * args.max_length / mean_len))
        padded_trainer = S.build_trainer(S.NanoChatSFTConfig(
            **common, packing=False, device_batch_size=padded_batch,
            total_batch_size=padded_batch * args.max_length), data)
        print(f"demo mixture, first {args.conversations} conversations: {stats['tokens']:,} tokens "
              f"({mean_len:.0f}/conversation), {stats['supervised']:,} supervised; packed into "
              f"{stats['packed_rows']} rows of {args.max_length} ({stats['tokens'] / stats['packed_rows'] / args.max_length:.1%} full, "
              f"~{per_row:.1f} conversations/row)")
        print(f"model d{args.depth} ({sum(p.numel() for p in packed_trainer.model.parameters()):,} params), "
              f"{torch.get_num_threads()} CPU threads; micro-batch: packed {args.batch} x {args.max_length} tokens, "
              f"padded {padded_batch} conversations padded to the longest")
        arms = {"padded": Arm(padded_trainer, args.steps + args.warmup),
                "packed": Arm(packed_trainer, args.steps + args.warmup)}
        for i in range(args.steps + args.warmup):  # interleaved, so load changes on a shared machine hit both
            for arm in arms.values():
                arm.step(record=i >= args.warmup)
        results = {name: arm.summary() for name, arm in arms.items()}
        for name, r in results.items():
            print(f"  {name:6s}: {r['sup_tok_per_s']:8.0f} supervised tok/s (mean-time {r['sup_tok_per_s_mean']:6.0f}) | "
                  f"median step {r['step_s'] * 1000:6.0f} ms | "
                  f"{r['supervised_per_step']:6.0f} supervised tok/step | padding {r['padding_frac']:.1%}")
        ratio = results["packed"]["sup_tok_per_s"] / results["padded"]["sup_tok_per_s"]
        mean_ratio = results["packed"]["sup_tok_per_s_mean"] / results["padded"]["sup_tok_per_s_mean"]
        print(f"packed / padded supervised tokens per second: {ratio:.2f}x (by mean step time {mean_ratio:.2f}x; "
              "goal >= 1.5x)")


if __name__ == "__main__":
    main()
