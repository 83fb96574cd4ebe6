"""CORE scoring throughput: batched scoring vs one forward per continuation (and per item, as the original).

    python bench/eval_core.py [--items 30] [--depth 4] [--device cpu]

Same model, same items, same run: the CORE subset's zero-shot tasks (hellaswag_zeroshot, copa, openbook_qa,
winogrande, lambada_openai), a NanoChat of the given depth (random weights: speed does not depend on them)
and a 4096-token BPE tokenizer trained on the embedded corpus. Prints examples/s of each mode, the ratio
against one forward per continuation, and checks that every mode gets the same per-item correctness.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

TASKS = ["hellaswag_zeroshot", "copa", "openbook_qa", "winogrande", "lambada_openai"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=30, help="items per task")
    parser.add_argument("--depth", type=int, default=4, help="model depth (width = 64 x depth)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    from eval.core import evaluate_task, load_bundle, sample_items
    from eval.core_subset import build_core_subset
    from modeling_nanochat import NanoChatConfig, NanoChatForCausalLM
    from modeling_nanochat.tokenization_nanochat import train_tokenizer
    from training.data import iter_texts, prepare_embedded_corpus

    with tempfile.TemporaryDirectory() as tmp:
        prepare_embedded_corpus(Path(tmp) / "data", num_shards=2)
        tokenizer = train_tokenizer(iter_texts(str(Path(tmp) / "data"), "train", max_chars=1_000_000), vocab_size=4096)
    bundle = load_bundle(build_core_subset())
    bos = tokenizer.convert_tokens_to_ids("<|bos|>")
    config = NanoChatConfig.from_depth(args.depth, vocab_size=len(tokenizer), max_seq_len=512, head_dim=64,
                                       bos_token_id=bos, pad_token_id=bos)
    torch.manual_seed(0)
    model = NanoChatForCausalLM(config).to(args.device).eval()
    data = {label: sample_items(bundle.load_items(bundle.task(label)), args.items) for label in TASKS}
    total = sum(len(v) for v in data.values())
    print(f"d{args.depth} NanoChat ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params) on {args.device}, "
          f"{total} items from {', '.join(TASKS)}, torch threads {torch.get_num_threads()}")

    modes = {
        "one forward per continuation": dict(max_batch_rows=1),
        "one forward per item (original)": dict(items_per_chunk=1, max_batch_rows=64),
        "batched (default)": dict(),
    }
    rates, correct = {}, {}
    for name, kwargs in modes.items():
        evaluate_task(model, tokenizer, bundle.task("copa"), data["copa"][:4], **kwargs)  # warm-up
        start = time.perf_counter()
        correct[name] = [evaluate_task(model, tokenizer, bundle.task(t), data[t], **kwargs).correct for t in TASKS]
        rates[name] = total / (time.perf_counter() - start)
    base = rates["one forward per continuation"]
    for name, rate in rates.items():
        print(f"{name:<34} {rate:8.1f} examples/s   {rate / base:5.2f}x")
    same = all(c == correct["one forward per continuation"] for c in correct.values())
    print(f"per-item correctness identical across modes: {same}")


if __name__ == "__main__":
    main()
