"""Fixtures for cache/generation tests: a byte-level tokenizer with nanochat's 9 special tokens."""

from __future__ import annotations

import pytest
import torch

SPECIAL_TOKENS = [
    "<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>",
]
VOCAB = 256 + len(SPECIAL_TOKENS)  # bytes 0..255, then the specials at 256..264 (nanochat puts them on top)


def build_byte_tokenizer():
    """An HF fast tokenizer: one token per byte (id = byte value), specials at the top, no BOS added."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from modeling_nanochat.tokenization_nanochat import BYTE_TO_UNICODE

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    chars = BYTE_TO_UNICODE  # GPT-2's byte -> printable character map, the one ByteLevel uses
    assert set(chars.values()) == set(alphabet)
    backend = Tokenizer(models.BPE(vocab={chars[b]: b for b in range(256)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|bos|>", eos_token="<|assistant_end|>",
                                   pad_token="<|bos|>", clean_up_tokenization_spaces=False)


@pytest.fixture(scope="session")
def byte_tokenizer():
    return build_byte_tokenizer()


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny models run one op at a time; with a shared 2-core machine, two torch threads spin-wait and make
    these tests 10-50x slower. One thread for this folder, restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
