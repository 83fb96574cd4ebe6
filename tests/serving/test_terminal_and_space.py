"""`nanochat chat` driven through a pseudo-terminal (streaming, tool calls shown, /clear, /exit) and
`nanochat space` (a self-contained Space folder whose app.py builds the chat app from its vendored code)."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
from serving_testdata import CALC_QUESTION, HELLO_QUESTION, HELLO_REPLY

from app.chat_cli import show_tools
from app.gradio_app import space_main

REPO = Path(__file__).resolve().parents[2]
ANSI = re.compile(r"\x1b\[[0-9;]*m")


class Terminal:
    """A program on a pty: `expect(text)` reads until the text appears (ANSI colors stripped)."""

    def __init__(self, argv: list[str]):
        self.master, slave = pty.openpty()
        env = {**os.environ, "TERM": "xterm", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, cwd=REPO, env=env, close_fds=True)
        os.close(slave)
        self.seen = ""

    def expect(self, text: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while text not in ANSI.sub("", self.seen):
            ready, _, _ = select.select([self.master], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise AssertionError(f"did not see {text!r}; the terminal shows:\n{ANSI.sub('', self.seen)}")
            try:
                self.seen += os.read(self.master, 65536).decode("utf-8", "replace")
            except OSError:  # the program exited
                raise AssertionError(f"exited before {text!r}:\n{ANSI.sub('', self.seen)}") from None
        plain = ANSI.sub("", self.seen)
        after = plain[plain.index(text) + len(text):]
        self.seen = self.seen[-len(after):] if after else ""  # keep only what came after the match
        return plain

    def send(self, line: str) -> None:
        os.write(self.master, (line + "\n").encode())

    def close(self) -> int:
        try:
            return self.proc.wait(20)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            os.close(self.master)


def test_show_tools():
    text = "x <|python_start|>6*7<|python_end|><|output_start|>42<|output_end|> y"
    assert show_tools(text) == "x [calculator: 6*7] [= 42] y"
    assert "\033[36m" in show_tools(text, color=True)


def test_terminal_chat(model_folder):
    term = Terminal([sys.executable, "-m", "app.cli", "chat", str(model_folder), "-t", "0", "-m", "60"])
    try:
        term.expect("You: ")
        term.send(CALC_QUESTION)
        screen = term.expect("You: ")
        assert "Assistant: Let me compute. [calculator: 6*7] [= 42] The answer is 42." in screen
        term.send(HELLO_QUESTION)  # second turn: the whole conversation is the prompt
        term.expect("You: ")
        term.send("/clear")
        term.expect("(conversation cleared)")
        term.expect("You: ")
        term.send(HELLO_QUESTION)
        assert f"Assistant: {HELLO_REPLY}" in term.expect("You: ")
        term.send("/exit")
        assert term.close() == 0
    finally:
        if term.proc.poll() is None:
            term.proc.kill()


def test_single_shot_and_bad_options(model_folder, capsys):
    from app.chat_cli import main

    assert main([str(model_folder), "-t", "0", "-p", HELLO_QUESTION]) == 0
    assert capsys.readouterr().out.strip() == HELLO_REPLY
    assert main([str(model_folder), "-t", "3"]) == 2
    assert "temperature must be between" in capsys.readouterr().err


def test_clear_errors_for_folders_that_cannot_chat(tmp_path, model_folder, capsys):
    from app.chat_cli import main as chat_main
    from app.server import main as serve_main

    assert serve_main([str(tmp_path / "nope")]) == 2
    assert "no config.json" in capsys.readouterr().err
    no_tokenizer = tmp_path / "model-only"
    no_tokenizer.mkdir()
    (no_tokenizer / "config.json").write_text((model_folder / "config.json").read_text())
    assert chat_main([str(no_tokenizer)]) == 2
    assert "has no tokenizer" in capsys.readouterr().err
    assert serve_main([str(model_folder), "--top-k", "500"]) == 2
    assert "--top-k must be in [0, 200]" in capsys.readouterr().err


def test_space_folder_is_self_contained(model_folder, tmp_path, capsys):
    out = tmp_path / "space"
    assert space_main([str(model_folder), str(out), "--title", "tiny chat"]) == 0
    assert "hf upload" in capsys.readouterr().out
    readme = (out / "README.md").read_text()
    front = readme.split("---")[1]
    assert "sdk: gradio" in front and "app_file: app.py" in front and "title: tiny chat" in front
    assert re.search(r"sdk_version: \d+\.\d+", front)
    requirements = (out / "requirements.txt").read_text()
    assert "gradio==" in requirements and "transformers==" in requirements
    assert (out / "model" / "config.json").is_file() and (out / "nanochat_hf" / "app" / "scheduler.py").is_file()
    assert space_main([str(model_folder), str(out)]) == 2  # refuses to overwrite
    # app.py builds the demo from the vendored copy (this repo is not on its path)
    probe = ("import runpy, sys; ns = runpy.run_path('app.py', run_name='space'); "
             "import app.gradio_app as g; print(type(ns['demo']).__name__, g.__file__)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-c", probe], cwd=out, env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-2000:]
    kind, path = run.stdout.split()[-2:]
    assert kind == "ChatInterface" and Path(path).is_relative_to(out)


def test_space_needs_a_model(tmp_path):
    with pytest.raises(SystemExit):
        space_main([])
    assert space_main([str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
