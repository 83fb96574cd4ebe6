"""ChatCORE (spec §9.2): categorical scoring against a hand computation, the six tasks' scoring (HumanEval in
the sandbox) with oracle and wrong answers, the centered mean, and the OpenAI-server backend."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from eval_testdata import byte_model, byte_tokenizer

from eval import chat as CH

PROBLEMS = 2


def reference_text(row: dict) -> str:
    """The dataset's own assistant answer, as text (tool calls written out, so `#### n` is in it)."""
    return "".join(p["text"] for p in row["messages"][-1]["content"])


class ScriptedBackend:
    """Answers with the reference (oracle) or with nonsense; records the generation settings it got."""

    def __init__(self, correct: bool):
        self.correct, self.calls = correct, []

    def categorical(self, rows):
        return [CH.gold_letter(r) if self.correct else "Z" for r in rows]

    def generate(self, rows, num_samples=1, **kwargs):
        self.calls.append(kwargs)
        return [[reference_text(r) if self.correct else "no idea"] * num_samples for r in rows]


@pytest.fixture(scope="module")
def datasets():
    return {name: CH.load_chat_task(name, PROBLEMS) for name in CH.CHATCORE_TASKS}


def run_all(backend, datasets, **kwargs):
    results = {n: CH.evaluate_chat_task(backend, n, datasets[n], **kwargs) for n in CH.CHATCORE_TASKS}
    return results


def test_oracle_scores_one_and_nonsense_scores_the_baseline(datasets):
    good = run_all(ScriptedBackend(True), datasets, max_new_tokens=7, temperature=0.0)
    assert {n: r["accuracy"] for n, r in good.items()} == {n: 1.0 for n in CH.CHATCORE_TASKS}
    assert all(r["num_problems"] == PROBLEMS and r["centered"] == pytest.approx(1.0) for r in good.values())
    bad = run_all(ScriptedBackend(False), datasets)
    assert all(r["accuracy"] == 0.0 for r in bad.values())
    assert bad["MMLU"]["centered"] == pytest.approx(-1 / 3) and bad["GSM8K"]["centered"] == 0.0


def test_chatcore_is_the_centered_mean_of_all_six(monkeypatch, datasets):
    monkeypatch.setattr(CH, "load_chat_task", lambda name, max_problems=None: datasets[name])
    backend = ScriptedBackend(False)
    result = CH.evaluate_chatcore(backend, max_problems=PROBLEMS, max_new_tokens=5)
    assert result["chatcore"] == pytest.approx((3 * (-1 / 3) + 3 * 0.0) / 6)
    assert result["chatcore_cat"] == pytest.approx(-1 / 3)
    assert backend.calls[0]["max_new_tokens"] == 5
    partial = CH.evaluate_chatcore(ScriptedBackend(True), ["GSM8K"])
    assert partial["chatcore"] is None and partial["chatcore_cat"] is None and partial["tasks"]["GSM8K"]["accuracy"] == 1
    with pytest.raises(ValueError, match="unknown ChatCORE task"):
        CH.evaluate_chatcore(backend, ["Jeopardy"])


def test_humaneval_needs_working_code(datasets):
    rows = [datasets["HumanEval"][i] for i in range(PROBLEMS)]
    solutions = [reference_text(r) for r in rows]
    assert CH.score_humaneval(rows, solutions) == [True, True]
    wrong = f"def {rows[1]['entry_point']}(*args, **kwargs):\n    return None"
    early_exit = "```python\nimport os\nos._exit(0)\n```"  # exits 0 before check() runs: must not pass
    assert CH.score_humaneval(rows, [early_exit, wrong]) == [False, False]


def test_pass_at_k_with_several_samples(datasets):
    class Alternating(ScriptedBackend):
        def generate(self, rows, num_samples=1, **kwargs):
            return [[reference_text(r) if s % 2 else "wrong" for s in range(num_samples)] for r in rows]

    result = CH.evaluate_chat_task(Alternating(True), "GSM8K", datasets["GSM8K"], num_samples=4)
    assert result["accuracy"] == 1.0 and result["pass@1"] == pytest.approx(0.5) and result["pass@4"] == 1.0


def test_local_categorical_matches_a_hand_computation(datasets):
    torch.set_num_threads(1)
    model, tokenizer = byte_model(), byte_tokenizer()
    backend = CH.LocalChat(model, tokenizer, batch_size=4)
    rows = [datasets["ARC-Easy"][0], datasets["MMLU"][0], datasets["MMLU"][1]]
    from modeling_nanochat.tokenization_nanochat import render_for_completion

    expected = []
    for row in rows:
        ids = render_for_completion(tokenizer, row["messages"])
        assert ids[-1] == tokenizer.convert_tokens_to_ids("<|assistant_start|>")
        with torch.no_grad():
            last = model(torch.tensor([ids])).logits[0, -1]
        letter_ids = [ord(letter) for letter in row["letters"]]  # byte tokenizer: a letter is its byte
        expected.append(row["letters"][int(last[letter_ids].argmax())])
    assert backend.categorical(rows) == expected
    completions = backend.generate(rows[:2], max_new_tokens=6)
    assert len(completions) == 2 and all(len(c) == 1 and isinstance(c[0], str) for c in completions)


class OracleServer(BaseHTTPRequestHandler):
    answers: dict[str, str] = {}
    requests: list[dict] = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, **body})
        content = type(self).answers.get(body["messages"][-1]["content"], "I don't know")
        payload = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


def test_server_backend(datasets):
    arc, gsm = datasets["ARC-Easy"], datasets["GSM8K"]
    OracleServer.answers = {arc[0]["messages"][0]["content"][0]["text"]: f" {CH.gold_letter(arc[0])}.",
                            gsm[0]["messages"][0]["content"][0]["text"]: "Let me see... #### " + gsm[0]["answer"]}
    server = ThreadingHTTPServer(("127.0.0.1", 0), OracleServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        backend = CH.ServerChat(f"http://127.0.0.1:{server.server_port}")
        assert CH.evaluate_chat_task(backend, "ARC-Easy", arc)["accuracy"] == 0.5
        assert CH.evaluate_chat_task(backend, "GSM8K", gsm, max_new_tokens=32)["accuracy"] == 0.5
        sent = OracleServer.requests[-1]
        assert sent["path"] == "/v1/chat/completions" and sent["max_tokens"] == 32 and sent["temperature"] == 0.0
        assert sent["messages"] == [{"role": "user", "content": gsm[1]["messages"][0]["content"][0]["text"]}]
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(RuntimeError, match="cannot reach the chat server"):
        CH.ServerChat(f"http://127.0.0.1:{server.server_port}/v1", timeout=2).generate([gsm[0]])
    with pytest.raises(ValueError, match="must start with http"):
        CH.ServerChat("localhost:8000")
