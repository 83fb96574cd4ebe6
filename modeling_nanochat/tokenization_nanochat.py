"""The nanochat tokenizer as a standard `transformers` fast tokenizer.

nanochat uses a GPT-4-style byte-level BPE (trained with rustbpe, run with tiktoken) with its own split
regex and 9 special tokens at the top of the vocabulary (spec §4). Here the same tokenizer is a plain
`PreTrainedTokenizerFast` folder (tokenizer.json + tokenizer_config.json + chat_template.jinja), so
`AutoTokenizer.from_pretrained(folder)` works without remote code, and every tool that reads
tokenizer.json (TGI, vLLM, TRL, lm-eval) sees the same ids.

One canonical form underlies everything: the tiktoken-style *rank table* (token bytes -> id, the 256 raw
bytes first with byte b at id b, then merged tokens in merge order). A trained tokenizer is turned into a
rank table, an original nanochat `tokenizer.pkl` already is one, and `tokenizer_from_ranks` builds the HF
tokenizer from it: merges are reconstructed from the ranks (every split of a token into two known tokens,
ordered by the token's rank) and the BPE model matches whole pre-tokens against the vocabulary first
(`ignore_merges`), which is what tiktoken does. So the HF tokenizer and a tiktoken `Encoding` with the same
ranks give the same ids (`to_tiktoken`).

Pre-tokenization: nanochat's split regex (`Split(isolated)`) then `ByteLevel(use_regex=False)`; no
normalizer. One addition: the Unicode noncharacter U+FDD0 (`PART_SEPARATOR`) is removed and splits the text
there. The chat template writes it between two adjacent assistant text parts so that, as in nanochat's
`render_conversation`, each part is encoded separately (BPE never merges across part boundaries). The cost:
U+FDD0 in ordinary text is dropped by this tokenizer (tiktoken would encode its 3 bytes). Noncharacters are
reserved for exactly this kind of internal use and do not occur in real text.

BOS: built with `add_bos_token=True`, so the saved tokenizer.json's post-processor makes `tokenizer(text)`
return `[<|bos|>, ...]`, the way nanochat's models were trained (every document starts with BOS); pass
`add_special_tokens=False` to leave it out. `apply_chat_template` never adds a second one (it writes BOS itself
and tokenizes with `add_special_tokens=False`). `encode_texts` is the explicit nanochat `encode`. (transformers
does not restore the `add_bos_token` attribute on load, so a loaded tokenizer reports False while it still
prepends BOS; setting `add_eos_token` on it rebuilds the post-processor without BOS.)

Chat format (spec §4.6): `render_conversation` is the plain-Python reference and `CHAT_TEMPLATE` the Jinja
template; both accept nanochat conversations (assistant content as a string or a list of text / python /
python_output parts) and the OpenAI/TRL shape (assistant `tool_calls` + `tool` messages, mapped to python /
python_output parts of the same assistant turn). They agree token for token and mask for mask, with one
documented exception: special-token text *inside message content* is encoded as plain text by the renderer
(nanochat's `encode_ordinary`) but parsed as the special token by `apply_chat_template`, as with every HF
chat template. For untrusted input, `apply_chat_template(..., sanitize_control_tokens=True)` keeps such text
plain (no prompt injection), though it encodes the text around it in pieces (and can't return masks).

Only stdlib, torch, transformers and tokenizers are imported at module level (this file is shipped to the
Hub as custom code); `tiktoken` is imported lazily by `to_tiktoken`.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import pickle
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
from transformers.utils import logging

logger = logging.get_logger(__name__)

# nanochat's split pattern (spec §4.1): GPT-4's, but numbers are split in runs of at most 2 digits.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)

BOS = "<|bos|>"
USER_START, USER_END = "<|user_start|>", "<|user_end|>"
ASSISTANT_START, ASSISTANT_END = "<|assistant_start|>", "<|assistant_end|>"
PYTHON_START, PYTHON_END = "<|python_start|>", "<|python_end|>"
OUTPUT_START, OUTPUT_END = "<|output_start|>", "<|output_end|>"
# Order = id order: they take the 9 ids right after the BPE vocabulary (32759..32767 for V = 32768).
SPECIAL_TOKENS = (
    BOS,
    USER_START,
    USER_END,
    ASSISTANT_START,
    ASSISTANT_END,
    PYTHON_START,
    PYTHON_END,
    OUTPUT_START,
    OUTPUT_END,
)
DEFAULT_VOCAB_SIZE = 32768
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
# Removed by the pre-tokenizer and a split point: keeps adjacent assistant text parts apart (see module doc).
PART_SEPARATOR = "\ufdd0"
# Name of the tiktoken Encoding, as in nanochat.
TIKTOKEN_NAME = "rustbpe"


class ChatFormatError(ValueError):
    """A conversation that nanochat's chat format cannot render (bad role, order, content or part)."""


# ---------------------------------------------------------------------------------------------------------
# Byte-level alphabet: GPT-2's reversible map from the 256 byte values to printable unicode characters.
# A byte-level vocabulary entry has one character per byte, so len(token string) == number of raw bytes.


def _bytes_to_unicode() -> dict[int, str]:
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


BYTE_TO_UNICODE = _bytes_to_unicode()
UNICODE_TO_BYTE = {c: b for b, c in BYTE_TO_UNICODE.items()}


def _to_vocab_string(token: bytes) -> str:
    return "".join(BYTE_TO_UNICODE[b] for b in token)


def _from_vocab_string(token: str) -> bytes:
    try:
        return bytes(UNICODE_TO_BYTE[c] for c in token)
    except KeyError as e:
        raise ValueError(
            f"token {token!r} is not a byte-level BPE token (character {e.args[0]!r} is outside the byte alphabet); "
            "only byte-level BPE tokenizers (like nanochat's and GPT-2's) are supported"
        ) from None


# ---------------------------------------------------------------------------------------------------------
# Building the HF tokenizer from a rank table


def _validate_ranks(mergeable_ranks: Mapping[bytes, int]) -> None:
    n = len(mergeable_ranks)
    if n < 256:
        raise ValueError(f"mergeable_ranks has {n} entries; a byte-level BPE needs at least the 256 single bytes")
    missing = [b for b in range(256) if bytes([b]) not in mergeable_ranks]
    if missing:
        raise ValueError(f"mergeable_ranks lacks {len(missing)} single-byte tokens (first: byte {missing[0]})")
    ranks = sorted(mergeable_ranks.values())
    if ranks != list(range(n)):
        bad = next(i for i, r in enumerate(ranks) if r != i)
        raise ValueError(f"mergeable_ranks must use every rank 0..{n - 1} exactly once; rank {bad} is missing or repeated")


def _merges_from_ranks(mergeable_ranks: Mapping[bytes, int]) -> list[tuple[str, str]]:
    # Every way to split a token into two known tokens is a merge, ranked by the merged token's rank (the
    # order tiktoken applies them in); ties between splits of one token go to the lower-ranked left part.
    merges = []
    for token, rank in mergeable_ranks.items():
        if len(token) < 2:
            continue
        splits = [
            (mergeable_ranks[token[:i]], mergeable_ranks[token[i:]], token[:i], token[i:])
            for i in range(1, len(token))
            if token[:i] in mergeable_ranks and token[i:] in mergeable_ranks
        ]
        merges.extend((rank, rank_l, rank_r, left, right) for rank_l, rank_r, left, right in splits)
    merges.sort()
    return [(_to_vocab_string(left), _to_vocab_string(right)) for _, _, _, left, right in merges]


def _pre_tokenizer(pattern: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(pattern=PART_SEPARATOR, behavior="removed"),
            pre_tokenizers.Split(pattern=Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def build_backend_tokenizer(
    mergeable_ranks: Mapping[bytes, int],
    special_tokens: Mapping[str, int] | None = None,
    pattern: str = SPLIT_PATTERN,
) -> Tokenizer:
    """Build a `tokenizers.Tokenizer` equivalent to `tiktoken.Encoding(pat_str=pattern, mergeable_ranks=...)`.

    Special tokens keep their ids, which must follow the ranks contiguously (as in nanochat and GPT-2).
    Works for any byte-level rank table (nanochat's, GPT-2's); see `tokenizer_from_ranks` for the full
    nanochat tokenizer with its chat template.
    """
    _validate_ranks(mergeable_ranks)
    vocab = {_to_vocab_string(token): rank for token, rank in mergeable_ranks.items()}
    backend = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=_merges_from_ranks(mergeable_ranks),
            fuse_unk=False,
            byte_fallback=False,
            ignore_merges=True,  # a pre-token that is itself a token is emitted whole, as tiktoken does
        )
    )
    backend.normalizer = None
    backend.pre_tokenizer = _pre_tokenizer(pattern)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = None
    expected = len(mergeable_ranks)
    for content, token_id in sorted((special_tokens or {}).items(), key=lambda kv: kv[1]):
        if token_id != expected:
            raise ValueError(
                f"special token {content!r} has id {token_id}, expected {expected}: special tokens must take the ids "
                f"right after the {len(mergeable_ranks)} BPE tokens, without gaps"
            )
        backend.add_special_tokens([AddedToken(content, special=True, normalized=False)])
        if backend.token_to_id(content) != token_id:
            raise ValueError(f"special token {content!r} collides with an existing vocabulary entry")
        expected += 1
    return backend


def tokenizer_from_ranks(mergeable_ranks: Mapping[bytes, int], pattern: str = SPLIT_PATTERN) -> PreTrainedTokenizerFast:
    """The nanochat HF tokenizer for a rank table: the 9 special tokens at ids len(ranks)..len(ranks)+8,
    `<|bos|>` as BOS (prepended by `tokenizer(text)`) and pad, `<|assistant_end|>` as EOS, and the chat template.
    """
    n = len(mergeable_ranks)
    backend = build_backend_tokenizer(
        mergeable_ranks, {tok: n + i for i, tok in enumerate(SPECIAL_TOKENS)}, pattern=pattern
    )
    return _wrap(backend)


def _wrap(backend: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=ASSISTANT_END,
        pad_token=BOS,
        extra_special_tokens=[t for t in SPECIAL_TOKENS if t not in (BOS, ASSISTANT_END)],
        add_bos_token=True,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )


def _backend_json(tokenizer: PreTrainedTokenizerFast | Tokenizer) -> dict:
    backend = tokenizer if isinstance(tokenizer, Tokenizer) else tokenizer.backend_tokenizer
    return json.loads(backend.to_str())


def split_pattern_of(tokenizer: PreTrainedTokenizerFast | Tokenizer) -> str:
    """The regex of the tokenizer's `Split` pre-tokenizer (nanochat's `SPLIT_PATTERN` for our tokenizers)."""
    pre = _backend_json(tokenizer).get("pre_tokenizer") or {}
    stack = [pre]
    while stack:
        node = stack.pop(0)
        if node.get("type") == "Split" and "Regex" in node.get("pattern", {}):
            return node["pattern"]["Regex"]
        stack.extend(node.get("pretokenizers", []))
    raise ValueError("tokenizer has no regex Split pre-tokenizer; it is not a nanochat/tiktoken-style tokenizer")


def ranks_from_tokenizer(tokenizer: PreTrainedTokenizerFast | Tokenizer) -> tuple[dict[bytes, int], dict[str, int]]:
    """Return (mergeable_ranks, special_tokens) of a byte-level BPE tokenizer: the tiktoken view of its vocab."""
    backend = tokenizer if isinstance(tokenizer, Tokenizer) else tokenizer.backend_tokenizer
    vocab = backend.get_vocab(with_added_tokens=False)
    ranks = {_from_vocab_string(token): token_id for token, token_id in vocab.items()}
    specials = {t.content: i for i, t in backend.get_added_tokens_decoder().items()}
    return ranks, specials


def to_tiktoken(tokenizer: PreTrainedTokenizerFast | Tokenizer, name: str = TIKTOKEN_NAME):
    """A `tiktoken.Encoding` with the same ranks, split pattern and special tokens (needs `pip install tiktoken`).

    Pickle it to `<base>/tokenizer/tokenizer.pkl` to hand a tokenizer back to the original nanochat.
    """
    try:
        import tiktoken
    except ImportError as e:
        raise ImportError("to_tiktoken needs the `tiktoken` package: pip install tiktoken") from e
    ranks, specials = ranks_from_tokenizer(tokenizer)
    return tiktoken.Encoding(name, pat_str=split_pattern_of(tokenizer), mergeable_ranks=ranks, special_tokens=specials)


# ---------------------------------------------------------------------------------------------------------
# Training


def iter_training_texts(
    texts: Iterable[str],
    *,
    max_chars: int | None = None,
    doc_cap: int | None = 10_000,
    progress: bool = False,
) -> Iterator[str]:
    """Yield documents cropped to their first `doc_cap` characters, stopping after the document that pushes
    the running character count past `max_chars` (nanochat's tok_train rule, spec §4.3).

    With `progress`, shows a bar counting characters (towards `max_chars` when it is finite).
    """
    if max_chars is not None and max_chars <= 0:
        raise ValueError(f"max_chars must be positive, got {max_chars}")
    if doc_cap is not None and doc_cap <= 0:
        raise ValueError(f"doc_cap must be positive, got {doc_cap}")
    bar = logging.tqdm(total=max_chars, unit="char", unit_scale=True, desc="tokenizer text", disable=not progress)
    nchars, pending = 0, 0
    try:
        for i, doc in enumerate(texts):
            if not isinstance(doc, str):
                raise TypeError(f"training document {i} is {type(doc).__name__}, expected str")
            if doc_cap is not None and len(doc) > doc_cap:
                doc = doc[:doc_cap]
            nchars += len(doc)
            pending += len(doc)
            if pending >= 1_000_000:
                bar.update(pending)
                pending = 0
            yield doc
            if max_chars is not None and nchars > max_chars:
                return
    finally:
        bar.update(pending)
        bar.close()


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    *,
    max_chars: int | None = None,
    doc_cap: int | None = 10_000,
    progress: bool = False,
) -> PreTrainedTokenizerFast:
    """Train nanochat's tokenizer on an iterable of documents (spec §4.1-4.3).

    A byte-level BPE with nanochat's split regex and no normalizer is trained with `tokenizers` to
    `vocab_size - 9` tokens (256 bytes + merges); the 9 special tokens take the top ids. Documents are cropped
    to `doc_cap` characters and reading stops past `max_chars` characters (`iter_training_texts`).
    If the corpus has too few distinct pairs to reach the size, the vocabulary is smaller (with a warning)
    and the special tokens follow it directly. Save the result with `tokenizer.save_pretrained(folder)`.
    """
    if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size={vocab_size!r} is too small: it must be at least {MIN_VOCAB_SIZE} "
            f"(256 byte tokens + {len(SPECIAL_TOKENS)} special tokens)"
        )
    stats = {"docs": 0, "chars": 0}

    def counted() -> Iterator[str]:
        for doc in iter_training_texts(texts, max_chars=max_chars, doc_cap=doc_cap, progress=progress):
            stats["docs"] += 1
            stats["chars"] += len(doc)
            yield doc

    trainer_tok = Tokenizer(models.BPE(fuse_unk=False, byte_fallback=False))
    trainer_tok.normalizer = None
    trainer_tok.pre_tokenizer = _pre_tokenizer(SPLIT_PATTERN)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        min_frequency=0,
        show_progress=progress,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    trainer_tok.train_from_iterator(counted(), trainer=trainer)
    if stats["chars"] == 0:
        raise ValueError(
            f"the training corpus has no text ({stats['docs']} documents, 0 characters): "
            "check the data files and the text column"
        )
    ranks = _ranks_from_trained(trainer_tok)
    if len(ranks) + len(SPECIAL_TOKENS) < vocab_size:
        warnings.warn(
            f"the corpus ({stats['docs']} documents, {stats['chars']} characters) only supports "
            f"{len(ranks)} BPE tokens; the vocabulary has {len(ranks) + len(SPECIAL_TOKENS)} ids instead of "
            f"{vocab_size}",
            stacklevel=2,
        )
    logger.info(f"trained tokenizer: {len(ranks)} BPE tokens on {stats['docs']} documents, {stats['chars']} chars")
    return tokenizer_from_ranks(ranks)


def _ranks_from_trained(trained: Tokenizer) -> dict[bytes, int]:
    # Canonical order: byte b at id b (the trainer sorts its alphabet by character instead), then merged
    # tokens in merge order. The trainer can produce one token from two different pairs: it keeps one id.
    model = _backend_json(trained)["model"]
    ranks = {bytes([b]): b for b in range(256)}
    for left, right in model["merges"]:
        token = _from_vocab_string(left + right)
        if token not in ranks:
            ranks[token] = len(ranks)
    return ranks


# ---------------------------------------------------------------------------------------------------------
# token_bytes


def token_bytes(tokenizer: PreTrainedTokenizerFast) -> torch.Tensor:
    """int32 tensor of length `len(tokenizer)`: the raw UTF-8 byte length of each token, 0 for special tokens.

    Read from the byte-level vocabulary (one character per byte), never by decoding single tokens, so
    tokens holding a partial UTF-8 sequence (e.g. a lone byte 0xE6) count their true byte length.
    Used as the denominator of bits-per-byte (spec §4.4, §6.8).
    """
    backend = tokenizer.backend_tokenizer
    lengths = [0] * len(tokenizer)
    for token, token_id in backend.get_vocab(with_added_tokens=False).items():
        lengths[token_id] = len(_from_vocab_string(token))
    for token_id, added in backend.get_added_tokens_decoder().items():
        # special tokens never count; a non-special added token is literal text
        lengths[token_id] = 0 if added.special else len(added.content.encode("utf-8"))
    return torch.tensor(lengths, dtype=torch.int32)


# ---------------------------------------------------------------------------------------------------------
# Encoding plain text (nanochat's `encode`: special-token text in the input is ordinary text)


@contextmanager
def _specials_as_text(tokenizer: PreTrainedTokenizerFast):
    backend = tokenizer.backend_tokenizer
    before = backend.encode_special_tokens
    backend.encode_special_tokens = True
    try:
        yield backend
    finally:
        backend.encode_special_tokens = before


def encode_texts(
    tokenizer: PreTrainedTokenizerFast, texts: Sequence[str], *, prepend_bos: bool = False
) -> list[list[int]]:
    """Batch-encode documents like nanochat's `encode` (tiktoken `encode_ordinary`): special-token text inside
    a document is plain text, nothing is added except `<|bos|>` in front when `prepend_bos`. Runs in parallel
    in Rust (set TOKENIZERS_PARALLELISM=false to turn that off).
    """
    if isinstance(texts, str):
        raise TypeError("encode_texts takes a list of strings; wrap a single text in a list")
    with _specials_as_text(tokenizer) as backend:
        encodings = backend.encode_batch_fast(list(texts), add_special_tokens=False)
    if not prepend_bos:
        return [e.ids for e in encodings]
    bos = tokenizer.convert_tokens_to_ids(BOS)
    return [[bos, *e.ids] for e in encodings]


# ---------------------------------------------------------------------------------------------------------
# Conversations: validation / normalization shared by the renderer, and the reference renderer


def _where(index: int, message: Any) -> str:
    role = message.get("role") if isinstance(message, Mapping) else None
    return f"message {index} (role {json.dumps(role)})"


def _text_of(content: Any, where: str) -> str:
    # user / system / tool content: a string, or a list of {"type": "text", "text": str} parts (concatenated)
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence) and not isinstance(content, (str, bytes, Mapping)):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ChatFormatError(
                    f"{where}: part {j} must be a text part {{'type': 'text', 'text': str}}, got {part!r}"
                )
            texts.append(part["text"])
        return "".join(texts)
    raise ChatFormatError(f"{where}: content must be a string or a list of text parts, got {type(content).__name__}")


def _tool_call_code(call: Any, where: str) -> str:
    # An OpenAI/TRL tool call becomes a python part: the "code" or "expression" argument, a string argument
    # verbatim, or the arguments as JSON.
    fn = call.get("function", call) if isinstance(call, Mapping) else None
    if not isinstance(fn, Mapping) or "arguments" not in fn or fn["arguments"] is None:
        raise ChatFormatError(f"{where}: a tool call needs {{'function': {{'arguments': ...}}}}, got {call!r}")
    args = fn["arguments"]
    if isinstance(args, str):
        return args
    if isinstance(args, Mapping):
        for key in ("code", "expression"):
            if isinstance(args.get(key), str):
                return args[key]
        return json.dumps(args, ensure_ascii=False)
    raise ChatFormatError(f"{where}: tool call arguments must be a string or an object, got {type(args).__name__}")


def _assistant_parts(message: Mapping, where: str) -> list[dict[str, str]]:
    content = message.get("content")
    parts: list[dict[str, str]] = []
    if isinstance(content, str):
        parts.append({"type": "text", "text": content})
    elif isinstance(content, Sequence) and not isinstance(content, (bytes, Mapping)):
        for j, part in enumerate(content):
            if not isinstance(part, Mapping) or not isinstance(part.get("text"), str):
                raise ChatFormatError(f"{where}: part {j} must be a dict with a string 'text', got {part!r}")
            if part.get("type") not in ("text", "python", "python_output"):
                raise ChatFormatError(
                    f"{where}: part {j} has unknown type {part.get('type')!r}; "
                    "expected 'text', 'python' or 'python_output'"
                )
            parts.append({"type": part["type"], "text": part["text"]})
    elif content is not None:
        raise ChatFormatError(
            f"{where}: assistant content must be a string or a list of parts, got {type(content).__name__}"
        )
    tool_calls = message.get("tool_calls")
    if tool_calls is not None:
        if isinstance(tool_calls, (str, bytes, Mapping)) or not isinstance(tool_calls, Sequence):
            raise ChatFormatError(f"{where}: tool_calls must be a list, got {type(tool_calls).__name__}")
        parts.extend({"type": "python", "text": _tool_call_code(call, where)} for call in tool_calls)
    return parts


def normalize_conversation(conversation: Any) -> list[dict[str, Any]]:
    """Validate a conversation and return it in nanochat's shape: the system message merged into the first
    user message (`system + "\\n\\n" + user`), then strictly alternating user (string content) / assistant
    (list of text / python / python_output parts) messages starting with user.

    Accepts `{"messages": [...]}` or a list of messages; assistant content as a string or parts; and the
    OpenAI/TRL shape: an assistant message's `tool_calls` become python parts (the code is the call's
    `arguments` "code" or "expression" value, a string `arguments` verbatim, else the arguments as JSON; the
    function name is not rendered: nanochat has one tool), following `tool` messages become python_output
    parts, and an assistant message after a tool message continues the same turn. User, system and tool
    content may also be a list of text parts (concatenated).
    Raises `ChatFormatError` naming the offending message.
    """
    messages = conversation.get("messages") if isinstance(conversation, Mapping) else conversation
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatFormatError(f"a conversation is a list of messages or {{'messages': [...]}}, got {conversation!r}")
    if len(messages) == 0:
        raise ChatFormatError("the conversation has no messages")
    out: list[dict[str, Any]] = []
    system: str | None = None
    last_role = None
    for i, message in enumerate(messages):
        where = _where(i, message)
        if not isinstance(message, Mapping):
            raise ChatFormatError(f"message {i} must be a dict with 'role' and 'content', got {message!r}")
        role = message.get("role")
        expect = "user" if not out or out[-1]["role"] == "assistant" else "assistant"
        if role == "system":
            if i != 0:
                raise ChatFormatError(f"{where}: a system message is only allowed as the first message")
            if len(messages) < 2 or not isinstance(messages[1], Mapping) or messages[1].get("role") != "user":
                raise ChatFormatError(f"{where}: a system message must be followed by a user message")
            system = _text_of(message.get("content"), where)
        elif role == "user":
            if expect != "user":
                raise ChatFormatError(
                    f"{where}: expected an assistant message (roles must alternate user/assistant, starting with user)"
                )
            text = _text_of(message.get("content"), where)
            if system is not None:
                text, system = system + "\n\n" + text, None
            out.append({"role": "user", "content": text})
        elif role == "assistant":
            parts = _assistant_parts(message, where)
            if expect == "assistant":
                out.append({"role": "assistant", "content": parts})
            elif last_role == "tool":
                out[-1]["content"].extend(parts)  # continues the turn the tool output belongs to
            else:
                raise ChatFormatError(
                    f"{where}: expected a user message (roles must alternate user/assistant, starting with user)"
                )
        elif role == "tool":
            if last_role not in ("assistant", "tool"):
                raise ChatFormatError(f"{where}: a tool message must follow an assistant message")
            out[-1]["content"].append({"type": "python_output", "text": _text_of(message.get("content"), where)})
        else:
            raise ChatFormatError(
                f"{where}: unknown role {role!r}; expected 'system' (first only), 'user', 'assistant' or 'tool'"
            )
        last_role = role
    return out


def render_conversation(
    tokenizer: PreTrainedTokenizerFast, conversation: Any, max_tokens: int | None = 2048
) -> tuple[list[int], list[int]]:
    """Tokenize a conversation for SFT exactly like nanochat (spec §4.6): returns (ids, mask), mask 1 on the
    supervised tokens (assistant text, python calls with their delimiters, `<|assistant_end|>`) and 0 on BOS,
    user turns, `<|assistant_start|>` and tool outputs. Every content string / part is encoded separately as
    plain text. Both lists are cut to `max_tokens`. See `normalize_conversation` for the accepted shapes.
    """
    messages = normalize_conversation(conversation)
    # (text, mask, is_special) segments, then one batched encode of all the texts
    segments: list[tuple[str, int, bool]] = [(BOS, 0, True)]
    for message in messages:
        if message["role"] == "user":
            segments += [(USER_START, 0, True), (message["content"], 0, False), (USER_END, 0, True)]
            continue
        segments.append((ASSISTANT_START, 0, True))
        for part in message["content"]:
            if part["type"] == "text":
                segments.append((part["text"], 1, False))
            elif part["type"] == "python":
                segments += [(PYTHON_START, 1, True), (part["text"], 1, False), (PYTHON_END, 1, True)]
            else:
                segments += [(OUTPUT_START, 0, True), (part["text"], 0, False), (OUTPUT_END, 0, True)]
        segments.append((ASSISTANT_END, 1, True))
    encoded = iter(encode_texts(tokenizer, [text for text, _, special in segments if not special]))
    ids: list[int] = []
    mask: list[int] = []
    for text, m, special in segments:
        piece = [tokenizer.convert_tokens_to_ids(text)] if special else next(encoded)
        ids += piece
        mask += [m] * len(piece)
    if max_tokens is not None:
        ids, mask = ids[:max_tokens], mask[:max_tokens]
    return ids, mask


def render_for_completion(
    tokenizer: PreTrainedTokenizerFast, conversation: Any, max_tokens: int | None = 2048
) -> list[int]:
    """The prompt for sampling an assistant reply (spec §4.7): drop the final assistant message, render the
    rest (cut to `max_tokens`), then append `<|assistant_start|>`. Used by RL and the chat evals.
    """
    messages = conversation.get("messages") if isinstance(conversation, Mapping) else conversation
    if not isinstance(messages, Sequence) or not messages:
        raise ChatFormatError("render_for_completion needs a non-empty conversation")
    messages = copy.deepcopy(list(messages))
    last = messages.pop()
    if not isinstance(last, Mapping) or last.get("role") != "assistant":
        raise ChatFormatError(
            f"render_for_completion: the last message must be the assistant's (it is removed), got {_where(len(messages), last)}"
        )
    ids, _ = render_conversation(tokenizer, messages, max_tokens=max_tokens)
    return ids + [tokenizer.convert_tokens_to_ids(ASSISTANT_START)]


# ---------------------------------------------------------------------------------------------------------
# Chat template. Mirrors normalize_conversation + render_conversation; `{% generation %}` marks exactly the
# mask-1 text so that apply_chat_template(..., return_assistant_tokens_mask=True) reproduces the mask.
# Generation blocks must stay at the template's top level (transformers measures their offsets in the
# root output stream), so macros only compute strings.

_CHAT_TEMPLATE = r"""
{#- nanochat chat format; the Python reference is render_conversation in tokenization_nanochat.py -#}
{%- macro text_of(content, where) -%}
    {%- if content is string -%}
        {{- content -}}
    {%- elif content is sequence and content is not mapping -%}
        {%- for part in content -%}
            {%- if part is not mapping or part['type'] != 'text' or part['text'] is not string -%}
                {{- raise_exception(where ~ ': part ' ~ loop.index0 ~ " must be a text part {'type': 'text', 'text': str}") -}}
            {%- endif -%}
            {{- part['text'] -}}
        {%- endfor -%}
    {%- else -%}
        {{- raise_exception(where ~ ': content must be a string or a list of text parts') -}}
    {%- endif -%}
{%- endmacro -%}
{%- macro tool_call_code(call, where) -%}
    {%- set fn = call['function'] if (call is mapping and call['function'] is defined) else call -%}
    {%- if fn is not mapping or fn['arguments'] is not defined or fn['arguments'] is none -%}
        {{- raise_exception(where ~ ": a tool call needs {'function': {'arguments': ...}}") -}}
    {%- endif -%}
    {%- set args = fn['arguments'] -%}
    {%- if args is string -%}
        {{- args -}}
    {%- elif args is mapping -%}
        {%- if args['code'] is string -%}
            {{- args['code'] -}}
        {%- elif args['expression'] is string -%}
            {{- args['expression'] -}}
        {%- else -%}
            {{- args | tojson -}}
        {%- endif -%}
    {%- else -%}
        {{- raise_exception(where ~ ': tool call arguments must be a string or an object') -}}
    {%- endif -%}
{%- endmacro -%}
{%- set ns = namespace(system=none, expect='user', open=false, prev_text=false, last_role=none) -%}
{{- '<|bos|>' -}}
{%- for message in messages -%}
    {%- set role = message['role'] if message['role'] is defined else none -%}
    {%- set where = 'message ' ~ loop.index0 ~ ' (role ' ~ (role | tojson) ~ ')' -%}
    {%- if role == 'system' -%}
        {%- if not loop.first -%}
            {{- raise_exception(where ~ ': a system message is only allowed as the first message') -}}
        {%- elif messages | length < 2 or messages[1]['role'] != 'user' -%}
            {{- raise_exception(where ~ ': a system message must be followed by a user message') -}}
        {%- endif -%}
        {%- set ns.system = text_of(message['content'], where) -%}
    {%- elif role == 'user' -%}
        {%- if ns.expect != 'user' -%}
            {{- raise_exception(where ~ ': expected an assistant message (roles must alternate user/assistant, starting with user)') -}}
        {%- endif -%}
        {%- if ns.open -%}
            {%- generation -%}{{- '<|assistant_end|>' -}}{%- endgeneration -%}
            {%- set ns.open = false -%}
        {%- endif -%}
        {{- '<|user_start|>' -}}
        {%- if ns.system is not none -%}
            {{- ns.system ~ '\n\n' -}}
            {%- set ns.system = none -%}
        {%- endif -%}
        {{- text_of(message['content'], where) -}}
        {{- '<|user_end|>' -}}
        {%- set ns.expect = 'assistant' -%}
    {%- elif role == 'assistant' -%}
        {%- if ns.expect == 'assistant' -%}
            {{- '<|assistant_start|>' -}}
            {%- set ns.open = true -%}
            {%- set ns.prev_text = false -%}
        {%- elif ns.last_role != 'tool' -%}
            {{- raise_exception(where ~ ': expected a user message (roles must alternate user/assistant, starting with user)') -}}
        {%- endif -%}
        {%- set content = message['content'] if message['content'] is defined else none -%}
        {%- if content is string -%}
            {%- if ns.prev_text -%}{{- '@PART_SEPARATOR@' -}}{%- endif -%}
            {%- generation -%}{{- content -}}{%- endgeneration -%}
            {%- set ns.prev_text = true -%}
        {%- elif content is sequence and content is not mapping -%}
            {%- for part in content -%}
                {%- if part is not mapping or part['text'] is not string -%}
                    {{- raise_exception(where ~ ': part ' ~ loop.index0 ~ " must be a dict with a string 'text'") -}}
                {%- elif part['type'] == 'text' -%}
                    {%- if ns.prev_text -%}{{- '@PART_SEPARATOR@' -}}{%- endif -%}
                    {%- generation -%}{{- part['text'] -}}{%- endgeneration -%}
                    {%- set ns.prev_text = true -%}
                {%- elif part['type'] == 'python' -%}
                    {%- generation -%}{{- '<|python_start|>' ~ part['text'] ~ '<|python_end|>' -}}{%- endgeneration -%}
                    {%- set ns.prev_text = false -%}
                {%- elif part['type'] == 'python_output' -%}
                    {{- '<|output_start|>' ~ part['text'] ~ '<|output_end|>' -}}
                    {%- set ns.prev_text = false -%}
                {%- else -%}
                    {{- raise_exception(where ~ ': part ' ~ loop.index0 ~ ' has unknown type ' ~ (part['type'] | tojson) ~ "; expected 'text', 'python' or 'python_output'") -}}
                {%- endif -%}
            {%- endfor -%}
        {%- elif content is not none -%}
            {{- raise_exception(where ~ ': assistant content must be a string or a list of parts') -}}
        {%- endif -%}
        {%- if message['tool_calls'] is defined and message['tool_calls'] is not none -%}
            {%- if message['tool_calls'] is string or message['tool_calls'] is mapping or message['tool_calls'] is not sequence -%}
                {{- raise_exception(where ~ ': tool_calls must be a list') -}}
            {%- endif -%}
            {%- for call in message['tool_calls'] -%}
                {%- generation -%}{{- '<|python_start|>' ~ tool_call_code(call, where) ~ '<|python_end|>' -}}{%- endgeneration -%}
                {%- set ns.prev_text = false -%}
            {%- endfor -%}
        {%- endif -%}
        {%- set ns.expect = 'user' -%}
    {%- elif role == 'tool' -%}
        {%- if ns.last_role != 'assistant' and ns.last_role != 'tool' -%}
            {{- raise_exception(where ~ ': a tool message must follow an assistant message') -}}
        {%- endif -%}
        {{- '<|output_start|>' ~ text_of(message['content'], where) ~ '<|output_end|>' -}}
        {%- set ns.prev_text = false -%}
    {%- else -%}
        {{- raise_exception(where ~ ': unknown role ' ~ (role | tojson) ~ "; expected 'system' (first only), 'user', 'assistant' or 'tool'") -}}
    {%- endif -%}
    {%- set ns.last_role = role -%}
{%- endfor -%}
{%- if ns.open and not (add_generation_prompt and ns.last_role == 'tool') -%}
    {%- generation -%}{{- '<|assistant_end|>' -}}{%- endgeneration -%}
{%- endif -%}
{%- if add_generation_prompt -%}
    {%- if ns.last_role == 'user' -%}
        {{- '<|assistant_start|>' -}}
    {%- elif ns.last_role != 'tool' -%}
        {{- raise_exception('add_generation_prompt needs a conversation that ends with a user message (or a tool message, to continue the assistant turn)') -}}
    {%- endif -%}
{%- endif -%}
"""
CHAT_TEMPLATE = _CHAT_TEMPLATE.strip().replace("@PART_SEPARATOR@", PART_SEPARATOR)


# ---------------------------------------------------------------------------------------------------------
# Original nanochat tokenizers (tiktoken Encoding pickles, .tiktoken rank files)


class _PickledEncoding:
    """Stands in for `tiktoken.core.Encoding` while unpickling, so no tiktoken install is needed."""

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _EncodingUnpickler(pickle.Unpickler):
    # Only the Encoding class may be constructed: a tokenizer pickle has no business running other code.
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in (("tiktoken.core", "Encoding"), ("tiktoken", "Encoding")):
            return _PickledEncoding
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: a nanochat tokenizer.pkl holds only a tiktoken Encoding"
        )


def read_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Read a tiktoken rank file (`<base64 token> <rank>` per line), e.g. GPT-2's `gpt2.tiktoken`."""
    path = Path(path)
    ranks = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as e:
            raise ValueError(f"{path}:{lineno}: expected '<base64 token> <rank>', got {line[:80]!r}") from e
    return ranks


def load_nanochat_encoding(path: str | os.PathLike) -> tuple[dict[bytes, int], dict[str, int], str]:
    """Read an original nanochat tokenizer: a folder with `tokenizer.pkl` (a pickled `tiktoken.Encoding`, as
    written by nanochat's RustBPETokenizer), the .pkl itself, or a `.tiktoken` rank file (base64 token + rank
    per line; nanochat's special tokens and split pattern are then assumed).
    Returns (mergeable_ranks, special_tokens, split_pattern). Does not need tiktoken installed.
    """
    path = Path(path)
    if path.is_dir():
        candidates = [path / "tokenizer.pkl", path / "tokenizer" / "tokenizer.pkl"]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise FileNotFoundError(
                f"no nanochat tokenizer in {path}: expected {candidates[0].name} (a pickled tiktoken Encoding) "
                f"there or in {candidates[1].parent}"
            )
        path = found
    elif not path.is_file():
        raise FileNotFoundError(f"nanochat tokenizer not found: {path} does not exist")
    if path.suffix == ".tiktoken":
        ranks = read_tiktoken_ranks(path)
        return ranks, {tok: len(ranks) + i for i, tok in enumerate(SPECIAL_TOKENS)}, SPLIT_PATTERN
    with open(path, "rb") as f:
        try:
            obj = _EncodingUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as e:
            raise ValueError(f"{path} is not a pickled tiktoken Encoding: {e}") from e
    state = getattr(obj, "state", None)
    if isinstance(state, str):
        raise ValueError(
            f"{path} pickles the registered tiktoken encoding {state!r} by name; it holds no rank table "
            "(not a trained nanochat tokenizer)"
        )
    if not isinstance(state, dict) or not {"pat_str", "mergeable_ranks", "special_tokens"} <= state.keys():
        raise ValueError(f"{path} does not hold a tiktoken Encoding (pat_str, mergeable_ranks, special_tokens)")
    return dict(state["mergeable_ranks"]), dict(state["special_tokens"]), state["pat_str"]


def convert_nanochat_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerFast:
    """Convert an original nanochat tokenizer (see `load_nanochat_encoding`) to the HF tokenizer without
    changing any id: BPE ranks become ids, the 9 special tokens keep theirs, the split pattern is kept.
    Save it with `save_pretrained`; `to_tiktoken` goes back.
    """
    ranks, specials, pattern = load_nanochat_encoding(path)
    missing = [t for t in SPECIAL_TOKENS if t not in specials]
    if missing:
        raise ValueError(f"{path} is not a nanochat tokenizer: special tokens {missing} are missing (has {sorted(specials)})")
    expected = {tok: len(ranks) + i for i, tok in enumerate(SPECIAL_TOKENS)}
    if specials != expected:
        wrong = {t: i for t, i in specials.items() if expected.get(t) != i}
        raise ValueError(f"{path}: special token ids {wrong} differ from nanochat's layout {expected}")
    if pattern != SPLIT_PATTERN:
        logger.warning(f"{path} uses a split pattern other than nanochat's; keeping it: {pattern!r}")
    return tokenizer_from_ranks(ranks, pattern=pattern)
