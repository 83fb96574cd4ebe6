"""Batched, tool-aware generation for NanoChat models (nanochat's Engine, spec §3) and its calculator.

The engine prefills every prompt once (several prompts of different lengths in one left-padded forward;
padding never enters the `NanoChatCache`), clones the cache for `num_samples` rows, then decodes one
token column per step with per-row state:

- sampling: temperature (0 = greedy), top-k, top-p, one seeded generator shared by all rows;
- a row completes at `<|assistant_end|>` or `<|bos|>` (it keeps being fed; callers ignore it);
- the calculator tool: when a row closes `<|python_end|>`, the expression since `<|python_start|>` is
  evaluated by `use_calculator` and `<|output_start|>result<|output_end|>` is forced into that row over
  the next steps while the other rows keep sampling. Forced tokens have mask 0, sampled ones mask 1
  (RL trains on the sampled ones only).

How callers use it:

    engine = NanoChatEngine(model, tokenizer)            # any HF tokenizer with the 9 special tokens
    for column, masks in engine.generate(ids, num_samples=4, max_tokens=256, temperature=0.8, top_k=50):
        ...                                               # one token per row per step (RL, eval)
    sequences, masks = engine.generate_batch(ids, num_samples=4, max_tokens=256)   # prompt + completion
    for text in engine.stream_text(ids, max_tokens=512, temperature=0.6):          # a server: UTF-8 safe deltas
        ...
    # or, from another thread, with transformers' TextIteratorStreamer:
    #   Thread(target=engine.generate_batch, args=(ids,), kwargs={"streamer": streamer}).start()
    batch = ContinuousBatch(engine, max_rows=16)         # a server: requests join/leave between decode steps
    batch.add([(key, BatchRequest(ids, max_tokens=64))]); outputs = batch.step()

The calculator never calls `eval`: it parses with `ast` and interprets a whitelist (numbers, + - * / // %,
parentheses, unary minus/plus, and `str.count` on string literals) with bounds on the expression length,
nesting, integer size and time, so it is safe in threaded servers (no SIGALRM) and returns None for
anything else.
"""

from __future__ import annotations

import ast
import math
import operator
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field, fields, replace

import torch

from .cache_nanochat import NanoChatCache

# --------------------------------------------------------------------------- calculator (spec §3.3)
MAX_EXPRESSION_CHARS = 1000  # longer tool calls are refused before parsing
MAX_DEPTH = 100  # nesting of the parsed expression
MAX_INT_BITS = 1024  # ~308 digits, like the float range: bigger integers (literals or results) are refused
MAX_STRING_CHARS = 10_000
TIME_BUDGET_S = 0.05  # checked at every node; the size bounds above already keep one call far below it

_BINARY_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}


class _Refused(Exception):
    pass


def _number(value):
    if type(value) is int:
        if value.bit_length() > MAX_INT_BITS:
            raise _Refused("integer too large")
        return value
    if type(value) is float:
        if not math.isfinite(value):
            raise _Refused("non-finite float")
        return value
    raise _Refused(f"not a number: {type(value).__name__}")


class _Calculator:
    """Interprets a whitelisted expression tree; anything outside the whitelist raises _Refused."""

    def __init__(self):
        self.deadline = time.monotonic() + TIME_BUDGET_S

    def eval(self, node: ast.AST, depth: int = 0):
        if depth > MAX_DEPTH or time.monotonic() > self.deadline:
            raise _Refused("too deep or too slow")
        if isinstance(node, ast.Constant):
            if type(node.value) is str:
                if len(node.value) > MAX_STRING_CHARS:
                    raise _Refused("string too long")
                return node.value
            return _number(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            value = _number(self.eval(node.operand, depth + 1))
            return -value if isinstance(node.op, ast.USub) else value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
            left = _number(self.eval(node.left, depth + 1))
            right = _number(self.eval(node.right, depth + 1))
            if isinstance(node.op, ast.Mult) and type(left) is int and type(right) is int:
                if left.bit_length() + right.bit_length() > MAX_INT_BITS + 1:
                    raise _Refused("product too large")  # refused before it is computed
            return _number(_BINARY_OPS[type(node.op)](left, right))
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "count"
            and not node.keywords
            and len(node.args) == 1  # commas are gone anyway (see use_calculator)
        ):
            text = self.eval(node.func.value, depth + 1)
            needle = self.eval(node.args[0], depth + 1)
            if type(text) is not str or type(needle) is not str:
                raise _Refused("str.count needs string literals")
            return text.count(needle)
        raise _Refused(f"not allowed: {type(node).__name__}")


def use_calculator(expression: str) -> int | float | None:
    """Evaluate a calculator tool call; None for anything that is not plain arithmetic or `str.count`.

    Like nanochat, commas are removed first ("1,000 * 3") and only ASCII is accepted. Allowed: int/float
    literals, + - * / // %, parentheses, unary minus/plus, `'literal'.count('literal')`. `**`, names, calls,
    attributes, and integers beyond MAX_INT_BITS are refused. Never raises.
    """
    try:
        if not isinstance(expression, str):
            return None
        expression = expression.replace(",", "").strip()
        if not expression or len(expression) > MAX_EXPRESSION_CHARS or not expression.isascii():
            return None
        tree = ast.parse(expression, mode="eval")
        result = _Calculator().eval(tree.body)
        return result if type(result) in (int, float) else None
    except Exception:  # _Refused, SyntaxError, ZeroDivisionError, OverflowError, RecursionError, MemoryError, ...
        return None


# --------------------------------------------------------------------------- special tokens
@dataclass(frozen=True)
class SpecialTokens:
    """Ids of nanochat's control tokens the engine acts on (None = absent)."""

    bos: int | None = None
    assistant_end: int | None = None
    python_start: int | None = None
    python_end: int | None = None
    output_start: int | None = None
    output_end: int | None = None

    TEXT = {
        "bos": "<|bos|>",
        "assistant_end": "<|assistant_end|>",
        "python_start": "<|python_start|>",
        "python_end": "<|python_end|>",
        "output_start": "<|output_start|>",
        "output_end": "<|output_end|>",
    }

    @classmethod
    def from_tokenizer(cls, tokenizer) -> SpecialTokens:
        """Look the tokens up with `convert_tokens_to_ids` (unknown tokens and the unk id count as absent)."""
        unk = getattr(tokenizer, "unk_token_id", None)

        def lookup(text: str) -> int | None:
            try:
                token_id = tokenizer.convert_tokens_to_ids(text)
            except Exception:
                return None
            if isinstance(token_id, int) and token_id >= 0 and token_id != unk:
                return token_id
            return None

        ids = {name: lookup(text) for name, text in cls.TEXT.items()}
        if ids["bos"] is None:
            ids["bos"] = getattr(tokenizer, "bos_token_id", None)
        return cls(**ids)

    @property
    def stop_ids(self) -> frozenset[int]:
        return frozenset(t for t in (self.assistant_end, self.bos) if t is not None)

    @property
    def has_tool(self) -> bool:
        return None not in (self.python_start, self.python_end, self.output_start, self.output_end)


# --------------------------------------------------------------------------- sampling
def sample_next_token(
    logits: torch.Tensor,
    generator: torch.Generator | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> torch.Tensor:
    """One token per row from (B, V) logits: argmax at temperature 0, else top-k, then top-p, then sample.

    Top-k follows nanochat (take the k best logits, divide by the temperature, softmax over those k,
    draw with the shared generator, map back to vocabulary ids). Top-p keeps the smallest set of
    highest-probability tokens whose mass reaches p (at least one).
    """
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float()
    if top_k is not None and top_k > 0:
        values, ids = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1)  # sorted, best first
    elif top_p is not None and top_p < 1.0:
        values, ids = torch.sort(logits, dim=-1, descending=True)
    else:
        probs = torch.softmax(logits / temperature, dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    probs = torch.softmax(values / temperature, dim=-1)
    if top_p is not None and top_p < 1.0:
        mass_before = probs.cumsum(-1) - probs
        probs = probs.masked_fill(mass_before >= top_p, 0.0)  # the best token always stays
    choice = torch.multinomial(probs, 1, generator=generator)
    return ids.gather(-1, choice).squeeze(-1)


# --------------------------------------------------------------------------- engine
@dataclass
class _Row:
    """Per-row decoding state: forced tokens queue and the calculator's state machine."""

    forced: deque = field(default_factory=deque)
    in_python: bool = False
    expression: list[int] = field(default_factory=list)
    completed: bool = False


class NanoChatEngine:
    """nanochat's Engine over a `NanoChatForCausalLM`: prefill once, clone, decode with tools.

    Args:
        model: a NanoChat causal LM (any device/dtype; generation runs under `torch.inference_mode`).
        tokenizer: an HF-style tokenizer (`convert_tokens_to_ids`, `encode`, `decode`). Needed for the
            calculator and `stream_text`; special ids are looked up from it.
        special_tokens: a `SpecialTokens` or a dict of its fields, overriding/replacing the tokenizer's.
        use_calculator_tool: run the calculator on `<|python_start|>...<|python_end|>` (needs a tokenizer).

    One engine may serve many threads: every call builds its own cache and generator.
    """

    def __init__(self, model, tokenizer=None, special_tokens: SpecialTokens | dict | None = None,
                 use_calculator_tool: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        base = SpecialTokens.from_tokenizer(tokenizer) if tokenizer is not None else SpecialTokens()
        if isinstance(special_tokens, dict):
            unknown = set(special_tokens) - {f.name for f in fields(SpecialTokens)}
            if unknown:
                raise ValueError(f"unknown special token names {sorted(unknown)}; known: {list(SpecialTokens.TEXT)}")
            base = replace(base, **special_tokens)
        elif special_tokens is not None:
            base = special_tokens
        self.special = base
        self.use_tool = use_calculator_tool and tokenizer is not None and base.has_tool

    # -- validation ---------------------------------------------------------------------------------
    def _prompts(self, tokens) -> list[list[int]]:
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.tolist()
        if not isinstance(tokens, (list, tuple)) or len(tokens) == 0:
            raise ValueError("tokens must be a non-empty list of token ids (or a list of such lists)")
        prompts = [list(tokens)] if not isinstance(tokens[0], (list, tuple)) else [list(p) for p in tokens]
        vocab = self.model.config.vocab_size
        for i, prompt in enumerate(prompts):
            if len(prompt) == 0:
                raise ValueError(f"prompt {i} is empty: start it with <|bos|> at least")
            for t in prompt:
                if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                    raise ValueError(f"prompt {i} has token {t!r}, expected ints in [0, {vocab})")
        return prompts

    def _check_sampling(self, num_samples, max_tokens, temperature, top_k, top_p, seed) -> None:
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
            raise ValueError(f"max_tokens must be a positive integer or None, got {max_tokens!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            math.isfinite(temperature) and temperature >= 0
        ):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
        vocab = self.model.config.vocab_size
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or not 0 <= top_k <= vocab):
            raise ValueError(f"top_k must be an integer in [0, {vocab}] (0 or None = off), got {top_k!r}")
        if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1] (None = off), got {top_p!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")

    # -- tokenizer helpers ------------------------------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        try:
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        except TypeError:  # tokenizers without the HF keyword (nanochat's own never adds specials)
            return list(self.tokenizer.encode(text))

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    # -- generation ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(
        self,
        tokens,
        num_samples: int = 1,
        max_tokens: int | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int = 42,
        streamer=None,
    ) -> Iterator[tuple[list[int], list[int]]]:
        """Yield (token_column, mask_column) per step, one entry per row (prompt-major, then sample).

        tokens: one prompt (list of ids) or several (list of lists; rows = prompts x num_samples).
        max_tokens: columns to generate (forced ones count); None = up to the model's context.
        streamer: a transformers streamer (`put`/`end`, e.g. TextIteratorStreamer) for a single row: it
            receives the prompt, every emitted token but the stop token, then `end()`.
        """
        prompts = self._prompts(tokens)
        self._check_sampling(num_samples, max_tokens, temperature, top_k, top_p, seed)
        rows_count = len(prompts) * num_samples
        if streamer is not None and rows_count != 1:
            raise ValueError("a streamer follows a single row: pass one prompt with num_samples=1")
        longest = max(len(p) for p in prompts)
        if max_tokens is None:
            max_tokens = self.model.config.max_position_embeddings - longest
            if max_tokens < 1:
                raise ValueError(
                    f"the prompt ({longest} tokens) fills the model's context "
                    f"({self.model.config.max_position_embeddings}); pass max_tokens explicitly"
                )
        model = self.model
        device = model.device
        generator = torch.Generator(device=device).manual_seed(seed)
        stop_ids = self.special.stop_ids

        # 1. prefill every prompt once (left-padded when lengths differ), then clone the rows
        cache, logits = self._prefill(prompts, longest + max_tokens)
        if num_samples > 1:
            cache.batch_repeat_interleave(num_samples)
            logits = logits.repeat_interleave(num_samples, dim=0)

        rows = [_Row() for _ in range(rows_count)]
        if streamer is not None:
            streamer.put(torch.tensor([prompts[0]]))
        try:
            for step in range(max_tokens):
                sampled = sample_next_token(logits, generator, temperature, top_k or None, top_p).tolist()
                column, masks = [], []
                for row, token in zip(rows, sampled):
                    forced = bool(row.forced)
                    token = row.forced.popleft() if forced else token
                    column.append(token)
                    masks.append(0 if forced else 1)
                    if streamer is not None and not row.completed and token not in stop_ids:
                        streamer.put(torch.tensor([token]))
                    if token in stop_ids:
                        row.completed = True
                    if self.use_tool:
                        self._tool_step(row, token)
                yield column, masks
                if step == max_tokens - 1 or all(row.completed for row in rows):
                    break
                next_ids = torch.tensor(column, device=device).unsqueeze(1)
                logits = model(input_ids=next_ids, cache=cache, logits_to_keep=1).logits[:, -1]
        finally:
            if streamer is not None:
                streamer.end()

    def _prefill(self, prompts: list[list[int]], max_cache_len: int) -> tuple[NanoChatCache, torch.Tensor]:
        """One left-padded forward over the prompts (padding never enters the cache): (cache, last logits)."""
        model = self.model
        device = model.device
        longest = max(len(p) for p in prompts)
        cache = NanoChatCache(model.config, max_cache_len=max_cache_len, max_batch_size=len(prompts), device=device,
                              dtype=model.get_input_embeddings().weight.dtype)
        ids = torch.zeros(len(prompts), longest, dtype=torch.long)
        mask = torch.zeros(len(prompts), longest, dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids[i, longest - len(prompt):] = torch.tensor(prompt)
            mask[i, longest - len(prompt):] = 1
        attention_mask = None if bool(mask.all()) else mask.to(device)
        logits = model(input_ids=ids.to(device), attention_mask=attention_mask, cache=cache, logits_to_keep=1).logits
        return cache, logits[:, -1]

    def _tool_step(self, row: _Row, token: int) -> None:
        special = self.special
        if token == special.python_start:
            row.in_python, row.expression = True, []
        elif token == special.python_end and row.in_python:
            row.in_python = False
            if row.expression:
                result = use_calculator(self._decode(row.expression))
                if result is not None:
                    row.forced.extend([special.output_start, *self._encode(str(result)), special.output_end])
            row.expression = []
        elif row.in_python:
            row.expression.append(token)

    def generate_batch(self, tokens, num_samples: int = 1, **kwargs) -> tuple[list[list[int]], list[list[int]]]:
        """Run `generate` to the end: per row, prompt + generated tokens (up to, not including, the first
        stop token) and masks (0 = prompt or forced, 1 = sampled)."""
        prompts = self._prompts(tokens)
        sequences = [list(p) for p in prompts for _ in range(num_samples)]
        masks = [[0] * len(p) for p in prompts for _ in range(num_samples)]
        done = [False] * len(sequences)
        stop_ids = self.special.stop_ids
        for column, mask_column in self.generate(prompts, num_samples=num_samples, **kwargs):
            for i, (token, m) in enumerate(zip(column, mask_column)):
                if done[i]:
                    continue
                if token in stop_ids:
                    done[i] = True
                    continue
                sequences[i].append(token)
                masks[i].append(m)
            if all(done):
                break
        return sequences, masks

    def stream_text(self, tokens, **kwargs) -> Iterator[str]:
        """Text deltas of a single row, never splitting a multi-byte character (nanochat's server logic).

        Tool-call tokens decode to their literal text and forced calculator output is streamed like any
        other text; the stop token is not emitted.
        """
        if self.tokenizer is None:
            raise ValueError("stream_text needs a tokenizer")
        if kwargs.get("num_samples", 1) != 1 or len(self._prompts(tokens)) != 1:
            raise ValueError("stream_text follows a single row: one prompt, num_samples=1")
        generated: list[int] = []
        emitted = ""
        for column, _ in self.generate(tokens, **kwargs):
            token = column[0]
            if token in self.special.stop_ids:
                break
            generated.append(token)
            text = self._decode(generated)
            if not text.endswith("\ufffd") and len(text) > len(emitted):
                yield text[len(emitted):]
                emitted = text


# --------------------------------------------------------------------------- continuous batching
@dataclass
class BatchRequest:
    """One row of a `ContinuousBatch`: a prompt and how to sample its continuation (engine semantics)."""

    prompt: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 42


@dataclass
class StepOutput:
    """What one row produced in one `ContinuousBatch.step`.

    finished: None while the row goes on; "stop" when `token` is a stop token (`<|assistant_end|>`/`<|bos|>`,
    not part of the reply), "length" when `token` was the row's last allowed one. A finished row has left.
    """

    key: object
    token: int
    forced: bool  # calculator output forced by the tool (not sampled)
    logprob: float | None  # log-probability of a sampled token under the model (None when forced)
    finished: str | None


@dataclass
class _BatchRow:
    key: object
    request: BatchRequest
    generator: torch.Generator
    state: _Row = field(default_factory=_Row)
    generated: int = 0


class ContinuousBatch:
    """Continuous batching over one `NanoChatCache`: rows join and leave a running decode batch between steps.

    Each `step()` samples one token for every row (per-row temperature/top-k/top-p and seeded generator, the
    engine's calculator state machine, stop tokens and `max_tokens`) and runs ONE decode forward for all the
    rows still going. `add()` prefills newcomers together (left-padded, in a cache of the same ring sizes) and
    appends their rows to the running cache; finished or `remove()`d rows are dropped with
    `batch_select_indices`. A row's tokens equal what `NanoChatEngine.generate` gives that prompt alone with
    the same seed (greedy: equal up to float rounding of the batched matmuls).

        batch = ContinuousBatch(engine, max_rows=16)
        batch.add([("a", BatchRequest(prompt_ids, max_tokens=64, temperature=0.0))])
        while len(batch):
            for out in batch.step(): ...          # and batch.add(...) / batch.remove(...) between steps

    Not thread-safe: one thread drives it (a server's worker). `max_cache_len` (default: the model's context)
    bounds prompt + max_tokens of every row.
    """

    def __init__(self, engine: NanoChatEngine, max_rows: int, max_cache_len: int | None = None):
        if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
            raise ValueError(f"max_rows must be a positive integer, got {max_rows!r}")
        context = engine.model.config.max_position_embeddings
        max_cache_len = context if max_cache_len is None else max_cache_len
        if isinstance(max_cache_len, bool) or not isinstance(max_cache_len, int) or max_cache_len < 2:
            raise ValueError(f"max_cache_len must be an integer >= 2, got {max_cache_len!r}")
        self.engine, self.max_rows, self.max_cache_len = engine, max_rows, max_cache_len
        self.rows: list[_BatchRow] = []
        self.cache: NanoChatCache | None = None
        self.logits: torch.Tensor | None = None  # (rows, V): the next-token logits of every row
        self._column: list[int] | None = None  # tokens sampled but not yet fed (between sample and forward)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def free(self) -> int:
        """Rows that can still join."""
        return self.max_rows - len(self.rows)

    @property
    def keys(self) -> list:
        return [row.key for row in self.rows]

    @torch.inference_mode()
    def add(self, items: list[tuple[object, BatchRequest]]) -> None:
        """Prefill the new prompts together and let them join the running batch (between two steps)."""
        if not items:
            return
        self.forward()
        if len(items) > self.free:
            raise ValueError(f"{len(items)} new rows but only {self.free} of {self.max_rows} are free")
        known = {row.key for row in self.rows}
        for key, request in items:
            if key in known:
                raise ValueError(f"row key {key!r} is already in the batch")
            known.add(key)
            self.engine._prompts([request.prompt])
            self.engine._check_sampling(1, request.max_tokens, request.temperature, request.top_k, request.top_p,
                                        request.seed)
            if len(request.prompt) + request.max_tokens > self.max_cache_len:
                raise ValueError(
                    f"prompt ({len(request.prompt)} tokens) + max_tokens ({request.max_tokens}) exceeds "
                    f"max_cache_len ({self.max_cache_len})"
                )
        # same ring sizes as the running cache (same max_cache_len), so the rows can simply be appended
        cache, logits = self.engine._prefill([request.prompt for _, request in items], self.max_cache_len)
        if self.cache is None:
            self.cache, self.logits = cache, logits
        else:
            _append_cache_rows(self.cache, cache)
            self.logits = torch.cat([self.logits, logits])
        for key, request in items:
            generator = torch.Generator(device=self.engine.model.device).manual_seed(request.seed)
            self.rows.append(_BatchRow(key, request, generator))

    def remove(self, keys) -> None:
        """Drop rows (e.g. cancelled requests) between steps; unknown keys are ignored."""
        keys = set(keys)
        keep = [i for i, row in enumerate(self.rows) if row.key not in keys]
        if len(keep) != len(self.rows):
            if self._column is not None:  # between sample() and forward(): the pending tokens follow their rows
                self._column = [self._column[i] for i in keep]
            self._keep(keep)

    def _keep(self, keep: list[int]) -> None:
        if not keep:
            self.rows, self.cache, self.logits, self._column = [], None, None, None
            return
        index = torch.tensor(keep, device=self.logits.device)
        self.rows = [self.rows[i] for i in keep]
        self.logits = self.logits.index_select(0, index)
        self.cache.batch_select_indices(index)

    def _sample(self, logits: torch.Tensor) -> list[int]:
        greedy = logits.argmax(dim=-1).tolist()
        out = []
        for i, row in enumerate(self.rows):
            r = row.request
            if r.temperature == 0.0:
                out.append(greedy[i])
            else:
                out.append(int(sample_next_token(logits[i:i + 1], row.generator, r.temperature, r.top_k or None, r.top_p)))
        return out

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """Sample one token per row, retire finished rows, and run one decode forward for the others."""
        outputs = self.sample()
        self.forward()
        return outputs

    @torch.inference_mode()
    def sample(self) -> list[StepOutput]:
        """The first half of `step`: one token per row from the current logits; finished rows leave.

        A server hands the outputs to its clients before calling `forward()`, so a row's first token goes
        out right after its prefill instead of after one more decode step.
        """
        self.forward()  # a previous sample() not followed by forward()
        if not self.rows:
            return []
        sampled = self._sample(self.logits)
        logprobs = torch.log_softmax(self.logits.float(), dim=-1).gather(
            1, torch.tensor(sampled, device=self.logits.device)[:, None]).squeeze(1).tolist()
        stop_ids = self.engine.special.stop_ids
        outputs, keep, column = [], [], []
        for i, row in enumerate(self.rows):
            forced = bool(row.state.forced)
            token = row.state.forced.popleft() if forced else sampled[i]
            row.generated += 1
            finished = "stop" if token in stop_ids else "length" if row.generated >= row.request.max_tokens else None
            if self.engine.use_tool:
                self.engine._tool_step(row.state, token)
            outputs.append(StepOutput(row.key, token, forced, None if forced else logprobs[i], finished))
            if finished is None:
                keep.append(i)
                column.append(token)
        if len(keep) != len(self.rows):
            self._keep(keep)
        self._column = column if self.rows else None
        return outputs

    @torch.inference_mode()
    def forward(self) -> None:
        """The second half of `step`: feed every row its last sampled token (no-op when nothing is pending)."""
        if self._column is None:
            return
        next_ids = torch.tensor(self._column, device=self.logits.device).unsqueeze(1)
        self._column = None
        self.logits = self.engine.model(input_ids=next_ids, cache=self.cache, logits_to_keep=1).logits[:, -1]


def _append_cache_rows(cache: NanoChatCache, other: NanoChatCache) -> None:
    """Append `other`'s rows to `cache` (same config and max_cache_len, so every ring has the same size).

    Lives here rather than on the cache because only continuous batching needs it; it keeps the cache's
    invariants: per-row lengths, the Python min/max copies, and the smear state follow the rows.
    """
    for mine, theirs in zip(cache.layers, other.layers):
        if mine.capacity != theirs.capacity:
            raise ValueError(f"cannot merge caches with ring sizes {mine.capacity} and {theirs.capacity}")
        mine.keys = torch.cat([mine.keys, theirs.keys])
        mine.values = torch.cat([mine.values, theirs.values])
    cache._lens = torch.cat([cache._lens, other._lens])
    if cache.prev_embedding is not None or other.prev_embedding is not None:
        cache.prev_embedding = torch.cat([cache.prev_embedding, other.prev_embedding])
    cache._min_len, cache._max_len = min(cache._min_len, other._min_len), max(cache._max_len, other._max_len)
    cache._seen = max(cache._seen, other._seen)
