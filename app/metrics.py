"""Prometheus metrics for the server, in the text exposition format (no client library needed).

Counters and histograms are plain Python numbers updated from the event loop and the worker threads (a
lost increment under a race is acceptable for monitoring); the scheduler's live state (active/queued
sequences, batch occupancy, decode steps, tokens) is read at scrape time.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


@dataclass
class Histogram:
    """A cumulative Prometheus histogram with fixed bucket bounds."""
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self):
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{bound}"}} {count}' for bound, count in zip(self.buckets, self.counts)]
        out += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.total}", f"{name}_count {self.count}"]
        return out


@dataclass
class Metrics:
    """What the server counts; `render(scheduler)` writes the Prometheus text."""

    requests: Counter = field(default_factory=Counter)  # (route, status) -> count
    finish_reasons: Counter = field(default_factory=Counter)
    rejected: int = 0
    prompt_tokens: int = 0
    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    duration: Histogram = field(default_factory=lambda: Histogram(DURATION_BUCKETS))

    def observe_ttft(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def observe_sequence(self, finish: str | None) -> None:
        self.finish_reasons[finish or "unknown"] += 1

    def observe_request(self, route: str, status: int, seconds: float | None = None) -> None:
        """Count one HTTP request (route is a bounded label) and, if given, its duration."""
        self.requests[(route, status)] += 1
        if seconds is not None:
            self.duration.observe(seconds)

    def render(self, scheduler) -> str:
        """The Prometheus text exposition of these counters and the scheduler's live state."""
        stats = scheduler.stats()
        workers = stats["workers"]
        lines = [
            "# HELP nanochat_requests_total HTTP requests by route and status.",
            "# TYPE nanochat_requests_total counter",
        ]
        lines += [f'nanochat_requests_total{{route="{route}",status="{status}"}} {count}'
                  for (route, status), count in sorted(self.requests.items())]
        lines += [
            "# HELP nanochat_rejected_requests_total Requests refused with 429 because the queue was full.",
            "# TYPE nanochat_rejected_requests_total counter",
            f"nanochat_rejected_requests_total {self.rejected}",
            "# HELP nanochat_prompt_tokens_total Prompt tokens submitted (times n).",
            "# TYPE nanochat_prompt_tokens_total counter",
            f"nanochat_prompt_tokens_total {self.prompt_tokens}",
            "# HELP nanochat_finished_sequences_total Finished sequences by finish reason.",
            "# TYPE nanochat_finished_sequences_total counter",
        ]
        lines += [f'nanochat_finished_sequences_total{{reason="{reason}"}} {count}'
                  for reason, count in sorted(self.finish_reasons.items())]
        per_worker = [
            ("generated_tokens_total", "counter", "Tokens generated (sampled or forced).", "generated_tokens"),
            ("decode_steps_total", "counter", "Batched decode steps.", "steps"),
            ("active_sequences", "gauge", "Sequences in the running batch.", "active"),
            ("queued_sequences", "gauge", "Sequences waiting for a batch slot.", "queued"),
            ("batch_occupancy", "gauge", "Running batch size / max batch size.", "occupancy"),
            ("mean_batch_size", "gauge", "Mean rows per decode step since start.", "mean_batch"),
        ]
        for name, kind, help_, key in per_worker:
            lines += [f"# HELP nanochat_{name} {help_}", f"# TYPE nanochat_{name} {kind}"]
            lines += [f'nanochat_{name}{{worker="{w["name"]}",device="{w["device"]}"}} {w[key]}' for w in workers]
        lines += ["# HELP nanochat_time_to_first_token_seconds Time from submission to the first generated token.",
                  "# TYPE nanochat_time_to_first_token_seconds histogram"]
        lines += self.ttft.lines("nanochat_time_to_first_token_seconds")
        lines += ["# HELP nanochat_request_duration_seconds Duration of generation requests.",
                  "# TYPE nanochat_request_duration_seconds histogram"]
        lines += self.duration.lines("nanochat_request_duration_seconds")
        return "\n".join(lines) + "\n"
