"""`nanochat tokenizer train | eval | convert`: train the BPE tokenizer, report its compression, convert an
original nanochat tokenizer.

    nanochat tokenizer train --data DATA_DIR --out runs/default/tokenizer      # spec §4.3 defaults
    nanochat tokenizer eval --tokenizer runs/default/tokenizer --data DATA_DIR
    nanochat tokenizer convert ~/.cache/nanochat/tokenizer runs/upstream/tokenizer

Data: parquet shards with a `text` column in nanochat's layout (sorted files; the last one is the validation
shard, the others are for training), read in order by `training.data.iter_texts`, so memory stays flat
whatever the corpus size.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import sys
import time
from pathlib import Path

from modeling_nanochat.tokenization_nanochat import (
    DEFAULT_VOCAB_SIZE,
    SPECIAL_TOKENS,
    build_backend_tokenizer,
    convert_nanochat_tokenizer,
    encode_texts,
    read_tiktoken_ranks,
    train_tokenizer,
)

# GPT-2's split pattern (tiktoken's r50k_base), used only to compare against GPT-2 in `eval`.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""

# Fixed held-out samples for `eval` (spec §4.5 reports the same kinds of text: news, Korean, code, math,
# science). Written for this project; any text works, these only need to stay fixed between runs.
EVAL_SAMPLES = {
    "news": (
        "The city council voted 7-2 on Tuesday to approve a $48 million plan to rebuild the harbor bridge, "
        "ending a decade-long debate over whether to repair or replace the 1962 structure. Construction is "
        "expected to begin next spring and last roughly three years, officials said, with one lane kept open "
        "in each direction throughout. \"This is the right call for the next fifty years,\" the mayor told "
        "reporters after the meeting."
    ),
    "korean": (
        "한국어는 한글이라는 고유한 문자 체계를 사용합니다. 한글은 15세기에 세종대왕이 창제하였으며, "
        "자음과 모음을 조합하여 음절 단위로 글자를 만듭니다. 오늘날 한국어 사용자는 약 8천만 명에 이릅니다."
    ),
    "code": (
        "def merge_sorted(a: list[int], b: list[int]) -> list[int]:\n"
        "    \"\"\"Merge two sorted lists in O(len(a) + len(b)).\"\"\"\n"
        "    out, i, j = [], 0, 0\n"
        "    while i < len(a) and j < len(b):\n"
        "        if a[i] <= b[j]:\n"
        "            out.append(a[i]); i += 1\n"
        "        else:\n"
        "            out.append(b[j]); j += 1\n"
        "    return out + a[i:] + b[j:]\n"
    ),
    "math": (
        "\\begin{theorem}For every $n \\geq 1$, $\\sum_{k=1}^{n} k^3 = \\left(\\frac{n(n+1)}{2}\\right)^2$."
        "\\end{theorem}\n\\begin{proof}By induction on $n$: the case $n=1$ gives $1 = 1$, and "
        "$\\left(\\frac{n(n+1)}{2}\\right)^2 + (n+1)^3 = \\left(\\frac{(n+1)(n+2)}{2}\\right)^2$.\\end{proof}"
    ),
    "science": (
        "Photosynthesis converts light energy into chemical energy: 6CO2 + 6H2O -> C6H12O6 + 6O2. In the "
        "light-dependent reactions, photosystem II splits water at about 680 nm, releasing O2 and feeding "
        "electrons to the electron transport chain, which pumps protons across the thylakoid membrane."
    ),
}


def _train(args: argparse.Namespace) -> int:
    from training.data import iter_texts

    print(f"training a {args.vocab_size}-id tokenizer on the train split of {args.data}, up to {args.max_chars:,} chars")
    t0 = time.time()
    tokenizer = train_tokenizer(
        iter_texts(args.data, "train"),
        vocab_size=args.vocab_size,
        max_chars=args.max_chars,
        doc_cap=args.doc_cap,
        progress=not args.no_progress,
    )
    elapsed = time.time() - t0
    # round-trip sanity check (as nanochat's tok_train does), on text with every kind of character
    sample = "Hello world! 12345 ünïcödé 日本語 😀\n\ttabs  and spaces <|bos|> end"
    ids = encode_texts(tokenizer, [sample])[0]
    if tokenizer.decode(ids) != sample:
        print(f"error: round trip failed: {sample!r} -> {tokenizer.decode(ids)!r}", file=sys.stderr)
        return 1
    out = Path(args.out)
    tokenizer.save_pretrained(out)
    first, last = tokenizer.convert_tokens_to_ids([SPECIAL_TOKENS[0], SPECIAL_TOKENS[-1]])
    print(f"saved {len(tokenizer)}-id tokenizer to {out} in {elapsed:.1f}s (special tokens at ids {first}..{last})")
    return 0


def _gpt2_vocab_file(arg: str | None) -> Path | None:
    if arg == "none":
        return None
    if arg not in (None, "auto"):
        path = Path(arg)
        if not path.is_file():
            raise FileNotFoundError(f"--gpt2-vocab: {path} does not exist")
        return path
    spec = importlib.util.find_spec("whisper")  # openai-whisper ships GPT-2's ranks; found without importing it
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "assets" / "gpt2.tiktoken"
    return path if path.is_file() else None


def _load_gpt2(path: Path):
    from transformers import PreTrainedTokenizerFast

    ranks = read_tiktoken_ranks(path)
    backend = build_backend_tokenizer(ranks, {"<|endoftext|>": len(ranks)}, pattern=GPT2_PATTERN)
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def evaluate(tokenizers: dict, samples: dict[str, str]) -> dict[str, dict[str, dict[str, float]]]:
    """bytes/token of each tokenizer on each named sample: {sample: {tokenizer: {bytes, tokens, ratio}}}."""
    report = {}
    for name, text in samples.items():
        nbytes = len(text.encode("utf-8"))
        report[name] = {}
        for tok_name, tok in tokenizers.items():
            ntok = len(encode_texts(tok, [text])[0])
            report[name][tok_name] = {"bytes": nbytes, "tokens": ntok, "ratio": nbytes / max(ntok, 1)}
    return report


def _eval(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    gpt2_file = _gpt2_vocab_file(args.gpt2_vocab)
    if not (Path(args.tokenizer) / "tokenizer.json").is_file():
        raise FileNotFoundError(f"--tokenizer: no tokenizer.json in {args.tokenizer} (train one with `train`)")
    tokenizers = {"ours": AutoTokenizer.from_pretrained(args.tokenizer)}
    if gpt2_file is not None:
        tokenizers["gpt2"] = _load_gpt2(gpt2_file)
    else:
        print("note: no GPT-2 vocabulary found (pass --gpt2-vocab FILE.tiktoken or pip install openai-whisper "
              "--no-deps); reporting our tokenizer only", file=sys.stderr)
    samples = dict(EVAL_SAMPLES)
    if args.data:
        from training.data import iter_texts

        for split in ("train", "val"):
            samples[f"{split}-docs"] = "\n".join(itertools.islice(iter_texts(args.data, split), args.max_docs))
    report = evaluate(tokenizers, samples)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    names = list(tokenizers)
    header = f"{'text':<12}{'bytes':>10}" + "".join(f"{n + ' tok':>12}{n + ' B/tok':>12}" for n in names)
    print(header)
    print("-" * len(header))
    for sample, row in report.items():
        line = f"{sample:<12}{row[names[0]]['bytes']:>10}"
        line += "".join(f"{row[n]['tokens']:>12}{row[n]['ratio']:>12.2f}" for n in names)
        print(line)
    return 0


def _convert(args: argparse.Namespace) -> int:
    tokenizer = convert_nanochat_tokenizer(args.source)
    tokenizer.save_pretrained(args.out)
    print(f"converted {args.source} -> {args.out} ({len(tokenizer)} ids)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `nanochat tokenizer` (sub-commands train, eval, convert)."""
    parser = argparse.ArgumentParser(prog="nanochat tokenizer", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train the BPE tokenizer on parquet shards and save an HF tokenizer folder")
    p.add_argument("--data", required=True,
                   help="parquet shards with a `text` column: a folder or glob (the last shard is held out) or hf:<dataset>")
    p.add_argument("--out", required=True, help="output folder (loadable with AutoTokenizer.from_pretrained)")
    p.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE, help="total ids including the 9 specials")
    p.add_argument("--max-chars", type=int, default=2_000_000_000, help="stop after this many characters")
    p.add_argument("--doc-cap", type=int, default=10_000, help="crop each document to this many characters")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="bytes per token on fixed samples and held-out shards, vs GPT-2 when available")
    p.add_argument("--tokenizer", required=True, help="tokenizer folder")
    p.add_argument("--data", help="parquet shards (as for train): also measure the first train and val documents")
    p.add_argument("--max-docs", type=int, default=1024, help="documents read from each split")
    p.add_argument("--gpt2-vocab", default="auto",
                   help="GPT-2 ranks (.tiktoken file); 'auto' uses openai-whisper's copy if installed; 'none' skips")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_eval)

    p = sub.add_parser("convert", help="convert an original nanochat tokenizer (tokenizer.pkl) to an HF folder")
    p.add_argument("source", help="nanochat tokenizer folder, tokenizer.pkl or .tiktoken rank file")
    p.add_argument("out", help="output folder")
    p.set_defaults(func=_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `nanochat tokenizer`; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"nanochat tokenizer {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
