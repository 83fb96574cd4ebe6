"""`nanochat tokenizer train | eval | convert` on tiny parquet shards."""

from __future__ import annotations

import json
import pickle

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizer_testdata import synthetic_texts
from transformers import AutoTokenizer

from app.cli import main as nanochat
from modeling_nanochat.tokenization_nanochat import SPECIAL_TOKENS, encode_texts, ranks_from_tokenizer


@pytest.fixture(scope="module")
def shards(corpus, tmp_path_factory):
    """Three shards like nanochat's: sorted names, the last one is the validation shard."""
    folder = tmp_path_factory.mktemp("shards")
    texts = corpus[:40] + synthetic_texts(300, seed=7)
    for i in range(3):
        pq.write_table(pa.table({"text": texts[i::3]}), folder / f"shard_{i:05d}.parquet", row_group_size=64)
    return folder


def test_train_then_load(shards, tmp_path, capsys):
    out = tmp_path / "tok"
    argv = ["tokenizer", "train", "--data", str(shards), "--out", str(out), "--vocab-size", "600",
            "--max-chars", "300000", "--doc-cap", "5000", "--no-progress"]
    assert nanochat(argv) == 0
    assert "saved 600-id tokenizer" in capsys.readouterr().out
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == 600
    assert tok.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == list(range(591, 600))
    assert tok.decode(encode_texts(tok, ["round trip ünï 123"])[0]) == "round trip ünï 123"


def test_eval_reports_bytes_per_token(shards, tokenizer_dir, capsys):
    assert nanochat(["tokenizer", "eval", "--tokenizer", str(tokenizer_dir), "--data", str(shards),
                     "--max-docs", "20", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"news", "korean", "code", "math", "science", "train-docs", "val-docs"} <= set(report)
    for row in report.values():
        assert row["ours"]["ratio"] == pytest.approx(row["ours"]["bytes"] / row["ours"]["tokens"])
    assert nanochat(["tokenizer", "eval", "--tokenizer", str(tokenizer_dir), "--gpt2-vocab", "none"]) == 0
    table = capsys.readouterr()
    assert "ours B/tok" in table.out and "gpt2" not in table.out and "no GPT-2 vocabulary" in table.err


def test_convert_command(tokenizer, tmp_path):
    tiktoken = pytest.importorskip("tiktoken")
    ranks, specials = ranks_from_tokenizer(tokenizer)
    enc = tiktoken.Encoding("rustbpe", pat_str=tokenizer_pattern(tokenizer), mergeable_ranks=ranks,
                            special_tokens=specials)
    (tmp_path / "tokenizer.pkl").write_bytes(pickle.dumps(enc))
    assert nanochat(["tokenizer", "convert", str(tmp_path), str(tmp_path / "hf")]) == 0
    hf = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert encode_texts(hf, ["conversion 12345"])[0] == enc.encode_ordinary("conversion 12345")


def tokenizer_pattern(tokenizer):
    from modeling_nanochat.tokenization_nanochat import split_pattern_of

    return split_pattern_of(tokenizer)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--data", "/nonexistent/shards", "--out", "x"], "data directory /nonexistent/shards does not exist"),
        (["train", "--data", "{empty}", "--out", "x"], "contains no .parquet files"),
        (["train", "--data", "{shards}/shard_00000.parquet", "--out", "x"], "need at least 2 parquet shards"),
        (["train", "--data", "{shards}", "--out", "x", "--vocab-size", "100"], "vocab_size=100 is too small"),
        (["eval", "--tokenizer", "{empty}"], "--tokenizer: no tokenizer.json in"),
        (["eval", "--tokenizer", "{tok}", "--gpt2-vocab", "/nonexistent/gpt2.tiktoken"], "--gpt2-vocab: /nonexistent"),
        (["convert", "{empty}", "x"], "no nanochat tokenizer in"),
    ],
)
def test_bad_input_exits_1_with_a_clear_message(shards, tokenizer_dir, tmp_path, capsys, argv, message):
    argv = [a.format(shards=shards, empty=tmp_path, tok=tokenizer_dir) for a in argv]
    assert nanochat(["tokenizer", *argv]) == 1
    assert message in capsys.readouterr().err
