"""token_bytes: raw byte length per id, from the byte-level vocabulary (spec §4.4)."""

from __future__ import annotations

import torch

from modeling_nanochat.tokenization_nanochat import (
    SPECIAL_TOKENS,
    encode_texts,
    ranks_from_tokenizer,
    token_bytes,
)


def test_shape_dtype_and_specials(tokenizer):
    tb = token_bytes(tokenizer)
    assert tb.dtype == torch.int32 and tb.shape == (len(tokenizer),)
    special_ids = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    assert tb[special_ids].tolist() == [0] * 9
    assert (tb[: len(tokenizer) - 9] > 0).all()


def test_every_raw_byte_counts_one_including_lone_high_bytes(tokenizer):
    tb = token_bytes(tokenizer)
    assert tb[:256].tolist() == [1] * 256
    # decoding a lone continuation / lead byte gives U+FFFD (3 bytes): the reason not to decode
    assert len(tokenizer.decode([0xE6]).encode("utf-8")) == 3 and tb[0xE6] == 1


def test_matches_the_rank_table_and_sums_to_the_text_length(tokenizer, heldout):
    tb = token_bytes(tokenizer)
    ranks, _ = ranks_from_tokenizer(tokenizer)
    assert all(tb[i] == len(token) for token, i in ranks.items())
    multibyte = [i for token, i in ranks.items() if len(token) > 1 and not _is_utf8(token)]
    assert multibyte  # partial UTF-8 sequences exist in the vocab and are counted by their raw length
    for text in heldout[-50:]:
        ids = encode_texts(tokenizer, [text], prepend_bos=True)[0]
        assert int(tb[ids].sum()) == len(text.encode("utf-8"))


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False
