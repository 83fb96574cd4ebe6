"""The generation scheduler: continuous batching on one worker thread per model replica, a bounded queue.

nanochat's server gives each GPU worker one request at a time and lets the others wait in an unbounded
queue. Here every replica (`Worker`) runs ONE decode loop over a `ContinuousBatch`: between two decode
steps, finished or cancelled sequences leave and waiting ones join (their prompts prefilled together), so
16 concurrent clients cost roughly one batched forward per token instead of 16. `Scheduler.submit` routes a
request to the least busy replica and refuses it with `QueueFull` (HTTP 429) when more than `max_queue`
sequences would have to wait for a free slot.

Threads: the asyncio event loop (HTTP handlers, Gradio) calls `submit` and iterates the returned
`Generation`; each worker thread drives its model and hands events back with `loop.call_soon_threadsafe`,
once per step. Cancelling a `Generation` (client gone) frees its slots before the next step.

Text: tokens are detokenized incrementally (`IncrementalDecoder`, never splitting a UTF-8 character) and
stop sequences are matched on the text (`StopMatcher`, holding back a possible prefix of a stop sequence).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import torch

from modeling_nanochat.generation_nanochat import BatchRequest, ContinuousBatch, NanoChatEngine

from .metrics import Metrics

logger = logging.getLogger("nanochat.server")


class QueueFull(RuntimeError):
    """Raised by `Scheduler.submit` when the request would overflow the waiting queue (answer 429)."""


@dataclass
class Event:
    """One token of one sequence of a `Generation`, as the routes see it.

    text: the new text to show (may be "" while a UTF-8 character or a possible stop sequence is incomplete;
    the stop token itself adds none). finish: None, or "eos" (a stop token), "stop_sequence", "length",
    "cancelled", "error" (then `error` says why) on the sequence's last event.
    """

    index: int
    token: int | None
    text: str
    logprob: float | None = None
    finish: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class SamplingParams:
    """What to generate for one request (validated by `app.limits`; `max_tokens` already fits the context)."""

    max_tokens: int
    temperature: float = 0.8
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()


class IncrementalDecoder:
    """Text deltas of a growing token list; a delta is emitted only when it ends on a whole character."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.read = 0  # tokens already turned into emitted text (a character boundary)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self._decode(self.ids[self.read:])
        if not text or text.endswith("\ufffd"):
            return ""
        self.read = len(self.ids)
        return text

    def flush(self) -> str:
        """Whatever is left (an incomplete character decodes to U+FFFD): the end of the sequence."""
        text = self._decode(self.ids[self.read:]) if self.read < len(self.ids) else ""
        self.read = len(self.ids)
        return text


class StopMatcher:
    """Cuts the text at the first stop sequence, holding back a tail that may be the start of one."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, stopped?)"""
        if not self.stops:
            return text, False
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(s[:k]):
                    hold = k
                    break
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class Generation:
    """Handle of a submitted request with `n` sequences: iterate it (async) for `Event`s; `cancel()` to stop.

    After iteration: `texts`, `finishes`, `completion_tokens` per sequence; `prompt_tokens`; `seeds`.
    """

    _ids = itertools.count()

    def __init__(self, prompt: list[int], params: SamplingParams, n: int, loop: asyncio.AbstractEventLoop):
        self.id = next(self._ids)
        self.prompt, self.params, self.n, self.loop = prompt, params, n, loop
        base = params.seed if params.seed is not None else random.SystemRandom().randrange(2**31)
        self.seeds = [base + i for i in range(n)]
        self.texts = [""] * n
        self.finishes: list[str | None] = [None] * n
        self.completion_tokens = [0] * n
        self.errors: list[str] = []
        self.created = time.monotonic()
        self.first_token_at: float | None = None
        self.worker: Worker | None = None
        self._queue: asyncio.Queue[list[Event]] = asyncio.Queue()
        self._open = n
        self._cancelled = threading.Event()

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt)

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def done(self) -> bool:
        return self._open == 0

    def cancel(self) -> None:
        """Stop generating (idempotent, any thread): the worker drops the sequences before its next step."""
        if not self._cancelled.is_set() and self._open > 0:
            self._cancelled.set()
            if self.worker is not None:
                self.worker.wake()

    def _deliver(self, events: list[Event]) -> None:  # worker thread
        try:
            self.loop.call_soon_threadsafe(self._queue.put_nowait, events)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self._cancelled.set()

    async def events(self) -> AsyncIterator[Event]:
        """Every event of every sequence, in generation order, until all `n` sequences finished."""
        while self._open > 0:
            for event in await self._queue.get():
                self.texts[event.index] += event.text
                if event.token is not None:
                    self.completion_tokens[event.index] += 1
                if event.finish is not None:
                    self.finishes[event.index] = event.finish
                    if event.error:
                        self.errors.append(event.error)
                    self._open -= 1
                yield event

    def __aiter__(self) -> AsyncIterator[Event]:
        return self.events()

    async def result(self) -> Generation:
        """Run to the end (for non-streaming responses)."""
        async for _ in self.events():
            pass
        return self


@dataclass
class _Sequence:
    generation: Generation
    index: int
    decoder: IncrementalDecoder
    stopper: StopMatcher
    started: bool = False

    @property
    def key(self) -> tuple[int, int]:
        return (self.generation.id, self.index)


@dataclass
class WorkerStats:
    steps: int = 0
    rows_stepped: int = 0  # sum over steps of the batch size: mean occupancy = rows_stepped / steps
    peak_batch: int = 0
    generated_tokens: int = 0
    prefill_tokens: int = 0
    finished_sequences: int = 0
    busy_seconds: float = 0.0


class Worker:
    """One model replica and the thread that runs its continuous-batching decode loop."""

    def __init__(self, engine: NanoChatEngine, max_batch: int, name: str = "worker-0", metrics: Metrics | None = None):
        self.engine, self.name, self.max_batch = engine, name, max_batch
        self.tokenizer = engine.tokenizer
        self.device = str(engine.model.device)
        self.metrics = metrics
        self.batch = ContinuousBatch(engine, max_batch)
        self.stats = WorkerStats()
        self._cond = threading.Condition()
        self._pending: deque[_Sequence] = deque()
        self._active: dict[tuple[int, int], _Sequence] = {}
        self._assigned = 0  # sequences submitted and not finished (pending + joining + active)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"nanochat-{name}", daemon=True)

    # -- called from other threads ------------------------------------------------------------------
    @property
    def assigned(self) -> int:
        return self._assigned

    @property
    def active(self) -> int:
        return len(self.batch)

    def start(self) -> None:
        """Start the decode loop thread."""
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop; sequences still running or waiting end with an error event."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def submit(self, generation: Generation) -> None:
        """Queue the generation's sequences; they join the batch at the next step with a free slot."""
        generation.worker = self
        sequences = [_Sequence(generation, i, IncrementalDecoder(self.tokenizer), StopMatcher(generation.params.stop))
                     for i in range(generation.n)]
        with self._cond:
            self._pending.extend(sequences)
            self._assigned += len(sequences)
            self._cond.notify_all()

    # -- the decode loop (worker thread) --------------------------------------------------------------
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cond:
                while not self._stopping and not self._pending and not self._active:
                    self._cond.wait()
                if self._stopping:
                    break
                admit, dropped = [], []
                while self._pending and len(admit) < self.batch.free + self._cancelled_active_count():
                    seq = self._pending.popleft()
                    (dropped if seq.generation.cancelled else admit).append(seq)
            events: dict[Generation, list[Event]] = {}
            for seq in dropped:
                self._finish(seq, Event(seq.index, None, "", finish="cancelled"), events)
            started = time.perf_counter()
            self._drop_cancelled(events)
            if admit:
                self._admit(admit, events)
            if self._active:
                self._step(events)
            for generation, batch in events.items():  # before the next forward: first tokens go out at once
                generation._deliver(batch)
            self._forward()
            self.stats.busy_seconds += time.perf_counter() - started
        for seq in list(self._active.values()) + list(self._pending):
            seq.generation._deliver([Event(seq.index, None, "", finish="error", error="the server is shutting down")])

    def _cancelled_active_count(self) -> int:
        return sum(1 for seq in self._active.values() if seq.generation.cancelled)

    def _finish(self, seq: _Sequence, event: Event, events: dict) -> None:
        self._active.pop(seq.key, None)
        with self._cond:
            self._assigned -= 1
        self.stats.finished_sequences += 1
        events.setdefault(seq.generation, []).append(event)
        if self.metrics is not None and event.finish not in ("cancelled", "error"):
            self.metrics.observe_sequence(event.finish)

    def _drop_cancelled(self, events: dict) -> None:
        gone = [seq for seq in self._active.values() if seq.generation.cancelled]
        if gone:
            self.batch.remove([seq.key for seq in gone])
            for seq in gone:
                self._finish(seq, Event(seq.index, None, "", finish="cancelled"), events)

    def _admit(self, sequences: list[_Sequence], events: dict) -> None:
        def request(seq: _Sequence) -> BatchRequest:
            p = seq.generation.params
            return BatchRequest(seq.generation.prompt, p.max_tokens, p.temperature, p.top_k, p.top_p,
                                seq.generation.seeds[seq.index])

        try:
            self.batch.add([(seq.key, request(seq)) for seq in sequences])
            ok = sequences
        except Exception:  # one bad row must not fail the others: retry one by one
            ok = []
            for seq in sequences:
                try:
                    self.batch.add([(seq.key, request(seq))])
                    ok.append(seq)
                except Exception as e:
                    logger.exception("%s: could not start a sequence", self.name)
                    self._finish(seq, Event(seq.index, None, "", finish="error", error=str(e)), events)
        for seq in ok:
            self._active[seq.key] = seq
            self.stats.prefill_tokens += len(seq.generation.prompt)

    def _step(self, events: dict) -> None:
        rows = len(self.batch)
        try:
            outputs = self.batch.sample()
        except Exception as e:  # e.g. out of memory: fail the sequences in flight, keep serving
            self._fail_all(e, events)
            return
        self.stats.steps += 1
        self.stats.rows_stepped += rows
        self.stats.peak_batch = max(self.stats.peak_batch, rows)
        self.stats.generated_tokens += len(outputs)
        now = time.monotonic()
        stopped = []
        for out in outputs:
            seq = self._active[out.key]
            generation = seq.generation
            if generation.first_token_at is None:
                generation.first_token_at = now
                if self.metrics is not None:
                    self.metrics.observe_ttft(now - generation.created)
            if out.finished == "stop":  # the stop token: counted, never shown
                text, finish = seq.decoder.flush(), "eos"
            else:
                text = seq.decoder.push(out.token)
                finish = "length" if out.finished == "length" else None
                if finish:
                    text += seq.decoder.flush()
            text, hit = seq.stopper.push(text)
            if hit:
                finish = "stop_sequence"
                if out.finished is None:
                    stopped.append(out.key)
            elif finish:
                text += seq.stopper.flush()
            event = Event(seq.index, out.token, text, out.logprob, finish)
            if finish:
                self._finish(seq, event, events)
            else:
                events.setdefault(generation, []).append(event)
        if stopped:
            self.batch.remove(stopped)

    def _forward(self) -> None:
        try:
            self.batch.forward()
        except Exception as e:
            events: dict[Generation, list[Event]] = {}
            self._fail_all(e, events)
            for generation, batch in events.items():
                generation._deliver(batch)

    def _fail_all(self, error: Exception, events: dict) -> None:
        logger.exception("%s: decode step failed", self.name)
        for seq in list(self._active.values()):
            self._finish(seq, Event(seq.index, None, "", finish="error", error=f"generation failed: {error}"), events)
        self.batch = ContinuousBatch(self.engine, self.max_batch)

    def snapshot(self) -> dict:
        """This replica's state and counters (for /stats and /metrics)."""
        s = self.stats
        return {
            "name": self.name, "device": self.device, "max_batch": self.max_batch, "active": self.active,
            "queued": max(0, self._assigned - self.max_batch), "assigned": self._assigned, "steps": s.steps,
            "mean_batch": round(s.rows_stepped / s.steps, 3) if s.steps else 0.0, "peak_batch": s.peak_batch,
            "occupancy": round(self.active / self.max_batch, 3), "generated_tokens": s.generated_tokens,
            "prefill_tokens": s.prefill_tokens, "finished_sequences": s.finished_sequences,
            "busy_seconds": round(s.busy_seconds, 3),
        }


def load_model(folder: str | Path, device: str | torch.device, dtype: str | None = None, tokenizer=None):
    """(model in eval mode on `device`, tokenizer) from a saved NanoChat folder; bf16 on GPU, fp32 on CPU by
    default. Checks the folder first, so a wrong path gets a clear message instead of a transformers traceback."""
    from transformers import AutoTokenizer

    from modeling_nanochat import NanoChatForCausalLM

    folder, device = Path(folder), torch.device(device)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a model folder (no config.json): pass a saved NanoChat folder")
    if tokenizer is None:
        if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
            raise FileNotFoundError(
                f"{folder} has no tokenizer (tokenizer.json): chat needs a folder saved with its tokenizer, "
                "as `nanochat pretrain` and `nanochat sft` write them"
            )
        tokenizer = AutoTokenizer.from_pretrained(folder)
    if dtype is not None and dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    torch_dtype = getattr(torch, dtype) if dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = NanoChatForCausalLM.from_pretrained(folder, dtype=torch_dtype).to(device).eval()
    return model, tokenizer


class Scheduler:
    """Routes requests to the least busy `Worker`; refuses them (`QueueFull`) beyond `max_queue` waiting sequences.

    Args:
        workers: one per model replica (GPU). All share the tokenizer and the context length.
        max_queue: sequences that may wait for a free batch slot (over all workers); 0 = refuse as soon as
            every slot is busy.
    """

    def __init__(self, workers: list[Worker], max_queue: int = 64, metrics: Metrics | None = None):
        if not workers:
            raise ValueError("a Scheduler needs at least one worker")
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0:
            raise ValueError(f"max_queue must be an integer >= 0, got {max_queue!r}")
        self.workers, self.max_queue = workers, max_queue
        self.metrics = metrics or Metrics()
        for worker in workers:
            worker.metrics = self.metrics
        self.tokenizer = workers[0].tokenizer
        self.context = workers[0].engine.model.config.max_position_embeddings
        self._lock = threading.Lock()
        self._started = False

    @classmethod
    def from_folder(cls, folder: str | Path, workers: int | None = None, max_batch: int = 16, max_queue: int = 64,
                    device: str | None = None, dtype: str | None = None, use_calculator: bool = True) -> Scheduler:
        """Load one replica per worker from a saved NanoChat folder (model + tokenizer).

        Workers default to one per CUDA device (one on CPU); worker i runs on `cuda:i % count`, or on `device`.
        """
        folder = Path(folder)
        gpus = torch.cuda.device_count()
        workers = workers if workers is not None else max(1, gpus)
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be a positive integer, got {workers!r}")
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be a positive integer, got {max_batch!r}")
        replicas, tokenizer = [], None
        for i in range(workers):
            dev = torch.device(device) if device else torch.device(f"cuda:{i % gpus}" if gpus else "cpu")
            model, tokenizer = load_model(folder, dev, dtype, tokenizer)
            engine = NanoChatEngine(model, tokenizer, use_calculator_tool=use_calculator)
            replicas.append(Worker(engine, max_batch, name=f"worker-{i}"))
        return cls(replicas, max_queue=max_queue)

    def start(self) -> None:
        """Start every worker (idempotent)."""
        with self._lock:
            if not self._started:
                for worker in self.workers:
                    worker.start()
                self._started = True

    def stop(self) -> None:
        """Stop every worker."""
        for worker in self.workers:
            worker.stop()

    @property
    def capacity(self) -> int:
        return sum(w.max_batch for w in self.workers)

    def submit(self, prompt: list[int], params: SamplingParams, n: int = 1) -> Generation:
        """Queue a request (n sequences) on the least busy worker; call from inside the event loop."""
        generation = Generation(prompt, params, n, asyncio.get_running_loop())
        with self._lock:
            worker = min(self.workers, key=lambda w: (w.assigned / w.max_batch, w.assigned))
            waiting = sum(max(0, w.assigned - w.max_batch) for w in self.workers)
            waiting += max(0, worker.assigned + n - worker.max_batch) - max(0, worker.assigned - worker.max_batch)
            if waiting > self.max_queue:
                self.metrics.rejected += 1
                raise QueueFull(
                    f"the server is busy: {self.capacity} sequences are generating and the queue of "
                    f"{self.max_queue} is full; retry later"
                )
            worker.submit(generation)
        self.metrics.prompt_tokens += len(prompt) * n
        return generation

    def stats(self) -> dict:
        """Workers, queue and batch occupancy (nanochat's /stats fields plus ours)."""
        workers = [w.snapshot() for w in self.workers]
        return {
            "total_workers": len(workers),
            "busy_workers": sum(1 for w in workers if w["assigned"] > 0),
            "available_workers": sum(1 for w in workers if w["assigned"] < w["max_batch"]),
            "max_batch": self.workers[0].max_batch,
            "active_sequences": sum(w["active"] for w in workers),
            "queued_sequences": sum(w["queued"] for w in workers),
            "max_queue": self.max_queue,
            "batch_occupancy": round(sum(w["active"] for w in workers) / self.capacity, 3),
            "workers": workers,
        }
