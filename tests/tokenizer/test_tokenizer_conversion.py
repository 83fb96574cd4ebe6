"""Original nanochat tokenizer (pickled tiktoken Encoding) -> HF folder -> tiktoken, ids unchanged."""

from __future__ import annotations

import base64
import importlib.util
import os
import pickle
import sys
from pathlib import Path

import pytest
from tokenizer_testdata import MULTILINGUAL
from transformers import AutoTokenizer

from modeling_nanochat.tokenization_nanochat import (
    SPECIAL_TOKENS,
    SPLIT_PATTERN,
    build_backend_tokenizer,
    convert_nanochat_tokenizer,
    encode_texts,
    load_nanochat_encoding,
    ranks_from_tokenizer,
    read_tiktoken_ranks,
    to_tiktoken,
)

tiktoken = pytest.importorskip("tiktoken")


@pytest.fixture(scope="module")
def upstream_dir(tokenizer, tmp_path_factory):
    """A nanochat base dir laid out like the original: <base>/tokenizer/tokenizer.pkl, written the way
    nanochat's RustBPETokenizer does (a tiktoken Encoding named "rustbpe", pickled)."""
    ranks, _ = ranks_from_tokenizer(tokenizer)
    specials = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
    enc = tiktoken.Encoding(name="rustbpe", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
    base = tmp_path_factory.mktemp("nanochat_base")
    (base / "tokenizer").mkdir()
    with open(base / "tokenizer" / "tokenizer.pkl", "wb") as f:
        pickle.dump(enc, f)
    return base, enc


def test_conversion_keeps_every_id(upstream_dir, heldout, tmp_path):
    base, enc = upstream_dir
    converted = convert_nanochat_tokenizer(base)  # finds <base>/tokenizer/tokenizer.pkl
    converted.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(loaded) == enc.n_vocab
    texts = heldout + [MULTILINGUAL]
    assert encode_texts(loaded, texts) == enc.encode_ordinary_batch(texts)
    for name in SPECIAL_TOKENS:
        assert loaded.convert_tokens_to_ids(name) == enc.encode_single_token(name)
    ids = enc.encode_ordinary(MULTILINGUAL)
    assert loaded.decode(ids) == enc.decode(ids) == MULTILINGUAL


def test_back_to_tiktoken_gives_the_same_encoding(upstream_dir, heldout):
    base, enc = upstream_dir
    back = to_tiktoken(convert_nanochat_tokenizer(base / "tokenizer" / "tokenizer.pkl"))
    assert back.name == "rustbpe" and back.n_vocab == enc.n_vocab
    assert back._mergeable_ranks == enc._mergeable_ranks and back._special_tokens == enc._special_tokens
    assert back.encode_ordinary_batch(heldout) == enc.encode_ordinary_batch(heldout)
    assert back.encode("<|bos|>hi", allowed_special="all") == enc.encode("<|bos|>hi", allowed_special="all")


def test_reading_the_pickle_does_not_need_tiktoken(upstream_dir, monkeypatch):
    base, enc = upstream_dir
    for name in [m for m in sys.modules if m == "tiktoken" or m.startswith("tiktoken.")]:
        monkeypatch.setitem(sys.modules, name, None)  # any import of tiktoken now fails
    ranks, specials, pattern = load_nanochat_encoding(base)
    assert ranks == enc._mergeable_ranks and specials == enc._special_tokens and pattern == SPLIT_PATTERN


def test_tiktoken_rank_file(upstream_dir, tmp_path, heldout):
    _, enc = upstream_dir
    path = tmp_path / "nanochat.tiktoken"
    lines = [f"{base64.b64encode(tok).decode()} {rank}" for tok, rank in enc._mergeable_ranks.items()]
    path.write_text("\n".join(lines) + "\n")
    converted = convert_nanochat_tokenizer(path)
    assert encode_texts(converted, heldout[-30:]) == enc.encode_ordinary_batch(heldout[-30:])
    path.write_text("not base64 at all\n")
    with pytest.raises(ValueError, match=r"nanochat.tiktoken:1: expected '<base64 token> <rank>'"):
        convert_nanochat_tokenizer(path)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"no nanochat tokenizer in {tmp_path}: expected tokenizer.pkl"):
        convert_nanochat_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_nanochat_tokenizer(tmp_path / "nope.pkl")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickles_that_run_code_or_hold_no_ranks_are_refused(tmp_path):
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(ValueError, match="not a pickled tiktoken Encoding: refusing to load"):
        convert_nanochat_tokenizer(evil)
    no_specials = tmp_path / "no_specials.pkl"
    no_specials.write_bytes(pickle.dumps(tiktoken.Encoding(
        "x", pat_str=SPLIT_PATTERN, mergeable_ranks={bytes([b]): b for b in range(256)}, special_tokens={})))
    with pytest.raises(ValueError, match=r"not a nanochat tokenizer: special tokens \[.*\] are missing"):
        convert_nanochat_tokenizer(no_specials)


def test_a_registered_encoding_pickled_by_name_is_refused(upstream_dir, tmp_path, monkeypatch):
    import tiktoken.registry

    _, enc = upstream_dir
    monkeypatch.setitem(tiktoken.registry.ENCODINGS, enc.name, enc)  # tiktoken then pickles just the name
    path = tmp_path / "tokenizer.pkl"
    path.write_bytes(pickle.dumps(enc))
    with pytest.raises(ValueError, match="pickles the registered tiktoken encoding 'rustbpe' by name"):
        convert_nanochat_tokenizer(path)


def test_wrong_special_ids_are_refused(upstream_dir, tmp_path):
    _, enc = upstream_dir
    specials = {name: enc.n_vocab + 5 + i for i, name in enumerate(SPECIAL_TOKENS)}
    bad = tiktoken.Encoding("rustbpe", pat_str=SPLIT_PATTERN, mergeable_ranks=enc._mergeable_ranks,
                            special_tokens=specials)
    path = tmp_path / "tokenizer.pkl"
    path.write_bytes(pickle.dumps(bad))
    with pytest.raises(ValueError, match="differ from nanochat's layout"):
        convert_nanochat_tokenizer(path)


def _gpt2_file() -> Path | None:
    spec = importlib.util.find_spec("whisper")
    path = Path(spec.origin).parent / "assets" / "gpt2.tiktoken" if spec and spec.origin else None
    return path if path and path.is_file() else None


@pytest.mark.skipif(_gpt2_file() is None, reason="GPT-2 ranks not installed (pip install openai-whisper --no-deps)")
def test_a_real_50k_vocabulary_converts_exactly(heldout):
    # GPT-2's ranks through the same builder: a large real-world rank table, checked against tiktoken
    from training.tokenizer import GPT2_PATTERN

    ranks = read_tiktoken_ranks(_gpt2_file())
    backend = build_backend_tokenizer(ranks, {"<|endoftext|>": 50256}, pattern=GPT2_PATTERN)
    enc = tiktoken.Encoding("gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                            special_tokens={"<|endoftext|>": 50256})
    backend.encode_special_tokens = True
    texts = heldout + [MULTILINGUAL]
    assert [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)] == enc.encode_ordinary_batch(texts)
