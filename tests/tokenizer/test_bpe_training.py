"""Training, vocabulary layout, split regex, encoding rules and the saved HF folder."""

from __future__ import annotations

import json
import warnings

import pytest
import regex
from tokenizer_testdata import MULTILINGUAL, VOCAB_SIZE
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from modeling_nanochat.tokenization_nanochat import (
    BOS,
    BYTE_TO_UNICODE,
    CHAT_TEMPLATE,
    MIN_VOCAB_SIZE,
    PART_SEPARATOR,
    SPECIAL_TOKENS,
    SPLIT_PATTERN,
    encode_texts,
    iter_training_texts,
    ranks_from_tokenizer,
    tokenizer_from_ranks,
    train_tokenizer,
)


def test_special_tokens_take_the_top_ids_in_nanochat_order(tokenizer):
    assert len(tokenizer) == VOCAB_SIZE
    top = list(range(VOCAB_SIZE - 9, VOCAB_SIZE))
    assert tokenizer.convert_ids_to_tokens(top) == list(SPECIAL_TOKENS)
    assert SPECIAL_TOKENS == (
        "<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
        "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>",
    )
    added = tokenizer.backend_tokenizer.get_added_tokens_decoder()
    assert sorted(added) == top and all(t.special for t in added.values())
    assert (tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id) == (
        VOCAB_SIZE - 9, VOCAB_SIZE - 9, VOCAB_SIZE - 5)


def test_default_vocab_size_puts_specials_at_spec_ids():
    # spec §4.2 for V = 32768: <|bos|> = 32759 ... <|output_end|> = 32767. Training 32768 tokens takes a big
    # corpus, so build the same layout from a synthetic rank table of 32759 tokens (bytes + 2-byte tokens).
    ranks = {bytes([b]): b for b in range(256)}
    for a in range(256):
        for b in range(256):
            if len(ranks) == 32759:
                break
            ranks.setdefault(bytes([a, b]), len(ranks))
    tok = tokenizer_from_ranks(ranks)
    assert len(tok) == 32768
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(32759, 32768))


def test_raw_bytes_have_ids_0_to_255(tokenizer):
    ids = tokenizer.convert_tokens_to_ids([BYTE_TO_UNICODE[b] for b in range(256)])
    assert ids == list(range(256))
    assert encode_texts(tokenizer, ["\x00\x7f"])[0] == [0, 127]


def _pieces(tokenizer, text):
    return [text[s:e] for _, (s, e) in tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)]


@pytest.mark.parametrize(
    ("text", "pieces"),
    [
        ("12345", ["12", "34", "5"]),  # \p{N}{1,2}: GPT-4's {1,3} would give 123|45
        ("in 2024!", ["in", " ", "20", "24", "!"]),
        ("I'M you'll DON'T", ["I", "'M", " you", "'ll", " DON", "'T"]),  # case-insensitive contractions
        ("a  \n\nb", ["a", "  \n\n", "b"]),
        ("x\r\n\ty", ["x", "\r\n", "\ty"]),
        ("hi...\n", ["hi", "...\n"]),
        ("٣٤٥ ½", ["٣٤", "٥", " ", "½"]),
    ],
)
def test_split_regex_examples(tokenizer, text, pieces):
    assert _pieces(tokenizer, text) == pieces


def test_split_regex_matches_a_regex_engine_on_varied_text(tokenizer, heldout):
    # the `regex` module runs the same pattern (possessive quantifiers included) independently of onig
    for text in heldout[-40:]:
        assert _pieces(tokenizer, text) == regex.findall(SPLIT_PATTERN, text)


def test_round_trip_and_no_normalization(tokenizer, heldout):
    for text in heldout:
        ids = encode_texts(tokenizer, [text])[0]
        assert tokenizer.decode(ids) == text
    # no normalizer: composed and decomposed é stay different
    assert encode_texts(tokenizer, ["caf\u00e9"]) != encode_texts(tokenizer, ["cafe\u0301"])


def test_bos_is_prepended_by_the_tokenizer_but_not_by_encode_texts(tokenizer):
    bos = tokenizer.convert_tokens_to_ids(BOS)
    plain = encode_texts(tokenizer, ["hello world"])[0]
    assert bos not in plain
    assert tokenizer("hello world").input_ids == [bos, *plain]
    assert tokenizer("hello world", add_special_tokens=False).input_ids == plain
    assert encode_texts(tokenizer, ["hello world"], prepend_bos=True)[0] == [bos, *plain]
    assert tokenizer.decode(tokenizer("hello world").input_ids, skip_special_tokens=True) == "hello world"


def test_encode_texts_treats_special_token_text_as_text(tokenizer):
    ids = encode_texts(tokenizer, ["a <|bos|> b <|assistant_end|>"])[0]
    assert not set(ids) & set(tokenizer.all_special_ids)
    assert tokenizer.decode(ids) == "a <|bos|> b <|assistant_end|>"
    # the plain HF call parses them, as any HF tokenizer does
    assert tokenizer.convert_tokens_to_ids(BOS) in tokenizer("a <|bos|>", add_special_tokens=False).input_ids
    with pytest.raises(TypeError, match="list of strings"):
        encode_texts(tokenizer, "not a list")


def test_part_separator_splits_and_is_dropped(tokenizer):
    a, b = "k.", "\n\nLet"
    joined = encode_texts(tokenizer, [a + b])[0]
    apart = encode_texts(tokenizer, [a])[0] + encode_texts(tokenizer, [b])[0]
    assert joined != apart  # BPE merges across the boundary unless it is split there
    assert encode_texts(tokenizer, [a + PART_SEPARATOR + b])[0] == apart


def test_too_small_vocab_is_rejected(corpus):
    with pytest.raises(ValueError, match=r"vocab_size=264 is too small: it must be at least 265"):
        train_tokenizer(corpus[:5], MIN_VOCAB_SIZE - 1)
    tok = train_tokenizer(corpus[:5], MIN_VOCAB_SIZE)  # bytes + specials, no merges
    assert len(tok) == MIN_VOCAB_SIZE


@pytest.mark.parametrize("texts", [[], ["", ""]])
def test_corpus_without_text_is_rejected(texts):
    with pytest.raises(ValueError, match="the training corpus has no text"):
        train_tokenizer(texts, 300)


def test_non_string_document_is_rejected():
    with pytest.raises(TypeError, match="training document 1 is int"):
        train_tokenizer(["ok", 3], 300)


def test_small_corpus_warns_and_keeps_specials_right_after_the_bpe_tokens():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tok = train_tokenizer(["abab abab"] * 10, 1000)
    assert any("only supports" in str(w.message) for w in caught)
    n_bpe = len(ranks_from_tokenizer(tok)[0])
    assert n_bpe < 1000 - 9
    assert tok.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == list(range(n_bpe, n_bpe + 9))


def test_max_chars_and_doc_cap_follow_tok_train():
    docs = ["a" * 30, "b" * 5, "c" * 50, "d" * 10, "e"]
    # each document cropped to 20 chars; stop after the document that pushes the total past 40
    assert list(iter_training_texts(docs, max_chars=40, doc_cap=20)) == ["a" * 20, "b" * 5, "c" * 20]
    assert list(iter_training_texts(docs, max_chars=None, doc_cap=None)) == docs
    with pytest.raises(ValueError, match="max_chars must be positive"):
        list(iter_training_texts(docs, max_chars=0))


def test_training_is_deterministic(corpus, tokenizer):
    again = train_tokenizer(corpus, VOCAB_SIZE)
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()


def test_ranks_round_trip_to_the_same_tokenizer(tokenizer):
    ranks, specials = ranks_from_tokenizer(tokenizer)
    assert sorted(ranks.values()) == list(range(VOCAB_SIZE - 9))
    assert specials == {t: VOCAB_SIZE - 9 + i for i, t in enumerate(SPECIAL_TOKENS)}
    assert tokenizer_from_ranks(ranks).backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()


def test_autotokenizer_round_trip(tokenizer, tokenizer_dir, heldout):
    loaded = AutoTokenizer.from_pretrained(tokenizer_dir)  # no trust_remote_code: a stock fast tokenizer
    assert isinstance(loaded, PreTrainedTokenizerBase) and loaded.is_fast
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    assert "auto_map" not in config
    assert loaded.chat_template == CHAT_TEMPLATE
    assert len(loaded) == len(tokenizer)
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == ("<|bos|>", "<|assistant_end|>", "<|bos|>")
    for text in heldout[-20:] + [MULTILINGUAL]:
        assert loaded(text).input_ids == tokenizer(text).input_ids
        assert encode_texts(loaded, [text]) == encode_texts(tokenizer, [text])
        assert loaded.decode(loaded(text).input_ids, skip_special_tokens=True) == text
