"""The code sandbox against hostile programs: each is contained and the test process is unharmed."""

from __future__ import annotations

import os
import socket
import sys
import time

import pytest

from eval.sandbox import extract_code, humaneval_imports, humaneval_program, run_many, run_python

BOOTSTRAP_MARK = 'compile(source, "program.py"'  # in the command line of every sandboxed interpreter


def isolated(result) -> bool:
    return {"pid-namespace", "network-namespace", "private-tmpfs-workdir"} <= set(result.isolation)


@pytest.fixture(scope="module")
def namespaces():
    probe = run_python("pass")
    if not isolated(probe):
        pytest.skip(f"kernel namespaces unavailable here ({probe.warnings}); only the in-process guards apply")
    return probe


def sandboxed_processes() -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if BOOTSTRAP_MARK.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


def test_result_types():
    ok = run_python("import sys; print('out'); print('err', file=sys.stderr)")
    assert (ok.status, ok.returncode, ok.stdout, ok.error) == ("passed", 0, "out\n", "")
    assert ok.passed and ok.stderr == "err\n"
    bad = run_python("def f():\n    raise ValueError('boom')\nf()")
    assert bad.status == "failed" and bad.error == "ValueError: boom" and "line 2, in f" in bad.stderr_tail
    assert run_python("raise SystemExit(3)").returncode == 3
    assert run_python("import os; os.abort()").status in ("error", "failed")
    with pytest.raises(TypeError):
        run_python(b"print(1)")


def test_infinite_loop_and_sleep_time_out():
    for code in ("while True: pass", "import time; time.sleep(60)"):
        start = time.monotonic()
        result = run_python(code, timeout=1.5)
        assert result.status == "timeout" and result.timed_out and result.error == "Execution timed out"
        assert time.monotonic() - start < 6


def test_memory_hog_is_stopped():
    result = run_python("x = bytearray(4 * 1024**3)\nprint('allocated')", memory_bytes=256 * 1024**2)
    assert result.status == "failed" and result.memory_exceeded and "allocated" not in result.stdout
    assert run_python("x = bytearray(50 * 1024**2)", memory_bytes=256 * 1024**2).passed  # modest use is fine


def test_fork_bomb_is_contained_and_leaves_no_process(namespaces):
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    start = time.monotonic()
    result = run_python(code, timeout=2)
    assert result.status == "timeout" and time.monotonic() - start < 10
    time.sleep(0.2)
    assert sandboxed_processes() == []
    escape = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\nelse:\n    time.sleep(60)"
    run_python(escape, timeout=1)  # a child that left the process group dies with the PID namespace
    time.sleep(0.2)
    assert sandboxed_processes() == []


def test_writes_outside_the_temp_dir_and_deletions_fail(tmp_path, namespaces):
    victim = tmp_path / "keep.txt"
    victim.write_text("precious")
    os.chmod(tmp_path, 0o777)
    os.chmod(victim, 0o666)
    outside = tmp_path / "pwned.txt"
    code = f"""
import os, shutil
errors = 0
for action in (lambda: open({str(outside)!r}, "w").write("x"), lambda: open("/tmp/nanochat-pwned", "w"),
               lambda: os.remove({str(victim)!r}), lambda: open({str(victim)!r}, "w"),
               lambda: shutil.rmtree({str(tmp_path)!r})):
    try:
        action()
    except OSError:
        errors += 1
open("inside.txt", "w").write("fine")  # the private temp dir is writable
print(errors, open("inside.txt").read())
"""
    result = run_python(code)
    assert result.status == "passed" and result.stdout.split() == ["5", "fine"], result.stderr
    assert victim.read_text() == "precious" and not outside.exists() and not os.path.exists("/tmp/nanochat-pwned")


def test_environment_secrets_are_not_visible(monkeypatch, namespaces):
    monkeypatch.setenv("NANOCHAT_TEST_SECRET", "hunter2-do-not-leak")
    code = f"""
import os
print(sorted(os.environ))
for path in ("/proc/1/environ", "/proc/{os.getpid()}/environ", "/proc/{os.getppid()}/environ"):
    try:
        print(open(path, "rb").read())
    except OSError as exc:
        print("denied", path)
"""
    result = run_python(code)
    assert result.passed, result.stderr
    assert "hunter2" not in result.stdout and "NANOCHAT_TEST_SECRET" not in result.stdout
    assert "HOME" in result.stdout and os.environ["NANOCHAT_TEST_SECRET"] == "hunter2-do-not-leak"


def test_no_network(namespaces):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    try:
        result = run_python(f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\ns.send(b'leak')")
        assert result.status == "failed" and ("unreachable" in result.error or "refused" in result.error), result.error
        with pytest.raises(OSError):  # nobody connected
            server.accept()
    finally:
        server.close()


def test_run_many_keeps_order():
    results = run_many([f"print({i})" for i in range(5)] + ["raise KeyError(1)"], workers=3)
    assert [r.stdout.strip() for r in results[:5]] == [str(i) for i in range(5)]
    assert results[5].status == "failed" and results[5].error == "KeyError: 1"


def test_humaneval_program_assembly():
    prompt = "from typing import List\nimport math\n\n\ndef f(x: List[int]) -> int:\n    '''doc'''\n"
    assert humaneval_imports(prompt) == "from typing import List\nimport math"
    completion = "Here you go:\n```python\ndef f(x):\n    return sum(x)\n```\nDone."
    assert extract_code(completion) == "def f(x):\n    return sum(x)"
    assert extract_code("  def f(x): return 1  ") == "def f(x): return 1"
    test = "def check(candidate):\n    assert candidate([1, 2]) == 3\n"
    assert run_python(humaneval_program(prompt, completion, test, "f")).passed
    assert run_python(humaneval_program(prompt, "def f(x):\n    return 0", test, "f")).status == "failed"
    assert sys.modules.get("socket") is not None  # the guards only ever touch the child
