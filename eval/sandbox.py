"""Run untrusted Python (model-written HumanEval solutions) in a contained child process.

    result = run_python("assert 1 + 1 == 2", timeout=5.0)
    result.status        # "passed" | "failed" | "timeout" | "error"
    result.stderr_tail   # the last lines of stderr (the exception, for a failure)

Layers, each applied when the OS allows it and listed in `result.isolation`:

- a fresh interpreter (`python -I -S`: no site-packages, no PYTHON* variables, no user site), started in a
  new session (its own process group), stdin from /dev/null, cwd a private temporary directory;
- a scrubbed environment: only PATH, HOME/TMPDIR (the private dir), LANG and thread-count variables;
- resource limits: CPU seconds, address space (memory), file size, open files, no core dumps, and a cap
  on the number of processes (fork bombs hit it);
- a wall-clock timeout after which the whole process group is killed;
- Linux namespaces (`unshare`): a new PID namespace (killing its first process kills every process the
  program started, even ones that left the process group), a new network namespace (no interfaces up:
  no network at all), and a mount namespace in which every mount is read-only and the working directory
  is a small private tmpfs; as root the program then runs as `nobody` (no access to root's files,
  other processes or their environments). Without root, a user namespace provides the same when the
  kernel allows unprivileged ones;
- where namespaces are unavailable (macOS, locked-down containers): the program also gets nanochat's
  in-process guards (destructive `os`/`shutil`/`subprocess` functions and `socket` disabled), which stop
  accidents, not attackers.

The original (spec §9.3) ran `exec` in a forked process with the in-process guards only and called itself
"not a security boundary"; here the boundary is the kernel's. Output is captured into files capped by the
file-size limit, so a program that prints forever cannot exhaust the parent's memory.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_TIMEOUT = 5.0
DEFAULT_MEMORY = 256 * 1024 * 1024
NOBODY = 65534

# The launcher runs inside the child interpreter before the program: limits, namespaces, privilege drop.
# It must only use the standard library and report what it applied on the status file descriptor.
_LAUNCHER = r'''
import ctypes, json, os, resource, signal, sys
cfg = json.loads(sys.argv[1])
status = os.fdopen(cfg["status_fd"], "w", buffering=1)
applied, warnings = [], []
def report(**kw):
    status.write(json.dumps(kw) + "\n")
libc = ctypes.CDLL(None, use_errno=True)
NEWNS, NEWUSER, NEWPID, NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
def mount(src, target, fstype, flags, data=None):
    enc = lambda s: None if s is None else s.encode()
    if libc.mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)) != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), target)
def limit(name, value):
    try:
        resource.setrlimit(getattr(resource, name), (value, value))
        applied.append(name.lower())
    except (ValueError, OSError) as exc:
        warnings.append(f"{name}: {exc}")
def others_can_run(path):  # could NOBODY traverse every parent folder and run the file?
    path = os.path.realpath(path)
    parts = path.split("/")
    def ok(p, bits):
        st = os.stat(p)
        return (st.st_mode >> 6 if st.st_uid == NOBODY else st.st_mode) & bits == bits
    return all(ok("/".join(parts[:i]) or "/", 1) for i in range(1, len(parts))) and ok(path, 5)
NOBODY, uid, gid, root = cfg["nobody"], os.getuid(), os.getgid(), os.geteuid() == 0
workdir, python = cfg["workdir"], sys.executable
flags = 0
if cfg["namespaces"]:
    candidates = [NEWNS | NEWPID | NEWNET, NEWPID | NEWNET] if root else [NEWUSER | NEWNS | NEWPID | NEWNET]
    for candidate in candidates:
        if libc.unshare(candidate) == 0:
            flags = candidate
            break
    else:
        warnings.append(f"unshare failed: {os.strerror(ctypes.get_errno())}")
    if flags & NEWUSER:  # be root inside (mounts need it); no other user is mapped
        for path, text in (("/proc/self/setgroups", "deny"), ("/proc/self/uid_map", f"0 {uid} 1"),
                           ("/proc/self/gid_map", f"0 {gid} 1")):
            with open(path, "w") as f:
                f.write(text)
        applied.append("user-namespace")
if flags & NEWNET:
    applied.append("network-namespace")
pid = os.fork() if flags & NEWPID else 0
if pid:  # the launcher waits for the namespace's first process (the program) and reports how it ended
    while True:
        try:
            _, wstatus = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    if os.WIFSIGNALED(wstatus):
        report(signal=os.WTERMSIG(wstatus))
        sys.exit(128 + os.WTERMSIG(wstatus))
    report(exit=os.WEXITSTATUS(wstatus))
    sys.exit(os.WEXITSTATUS(wstatus))
if flags & NEWPID:
    applied.append("pid-namespace")
drop = root and cfg["drop_privileges"]
owner = NOBODY if drop else 0
if flags & NEWNS:
    try:
        mount(None, "/", None, MS_REC | MS_PRIVATE)
        with open(os.path.join(workdir, "program.py"), "rb") as f:
            program = f.read()
        # the working directory becomes a small private tmpfs: nothing the program writes reaches the disk
        mount("tmpfs", workdir, "tmpfs", MS_NOSUID | MS_NODEV, f"size={cfg['disk_bytes']},mode=0700,uid={owner},gid={owner}")
        with open(os.path.join(workdir, "program.py"), "wb") as f:
            f.write(program)
        os.chown(os.path.join(workdir, "program.py"), owner, owner)
        if drop and not others_can_run(python):  # e.g. a pyenv under /root: bind its prefix where nobody can read it
            inner = os.path.join(workdir, ".python")
            os.mkdir(inner)
            mount(sys.base_prefix, inner, None, MS_BIND | MS_REC)
            python = os.path.join(inner, os.path.relpath(os.path.realpath(python), sys.base_prefix))
        try:
            mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        except OSError as exc:
            warnings.append(f"fresh /proc: {exc}")
        locked = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC}
        with open("/proc/self/mountinfo") as f:
            mounts = [line.split() for line in f]
        readonly = 0
        for fields in mounts:
            target = fields[4].encode().decode("unicode_escape")
            if target == workdir:
                continue
            extra = 0
            for opt in fields[5].split(","):
                extra |= locked.get(opt, 0)
            try:
                mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | extra)
                readonly += 1
            except OSError:
                pass
        applied += ["private-tmpfs-workdir", f"read-only-mounts:{readonly}/{len(mounts) - 1}"]
    except OSError as exc:
        flags &= ~NEWNS
        warnings.append(f"mount isolation failed: {exc}")
os.chdir(workdir)
limit("RLIMIT_CORE", 0)
limit("RLIMIT_CPU", cfg["cpu_seconds"])
limit("RLIMIT_FSIZE", cfg["file_bytes"])
limit("RLIMIT_NOFILE", 64)
if drop and not others_can_run(python):
    warnings.append(f"{python} is not readable by nobody: running as root")
    drop = False
if drop:
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    applied.append("uid-nobody")
# processes count per real user: nobody's (or a user namespace's) are ours alone, else leave room for the user's
shared_uid = not (drop or flags & NEWUSER)
limit("RLIMIT_NPROC", cfg["max_processes"] + (cfg["user_processes"] if shared_uid else 0))
limit("RLIMIT_AS", cfg["memory_bytes"])
if hasattr(libc, "prctl"):  # Linux: PR_SET_PDEATHSIG, die with the launcher (after the uid change, which clears it)
    libc.prctl(1, signal.SIGKILL)
guards = not (flags & NEWNS and flags & NEWPID and flags & NEWNET)
if guards:
    applied.append("python-guards")
report(applied=applied, warnings=warnings)
status.close()
os.execve(python, [python, "-I", "-S", "-c", cfg["bootstrap"], "1" if guards else "0"], cfg["env"])
'''

# Runs as the program's interpreter: optional in-process guards, then the program as __main__.
_BOOTSTRAP = r'''
import sys
if sys.argv[1] == "1":
    import builtins, faulthandler, os, shutil, subprocess
    faulthandler.disable()
    for name in ("kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork",
                 "forkpty", "killpg", "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown",
                 "chmod", "chown", "chroot", "lchown", "chdir"):
        if hasattr(os, name):
            setattr(os, name, None)
    shutil.rmtree = shutil.move = shutil.chown = None
    subprocess.Popen = None
    for name in ("socket", "_socket", "ctypes", "_ctypes", "resource", "psutil", "multiprocessing"):
        sys.modules[name] = None
sys.argv = ["program.py"]
source = open("program.py", encoding="utf-8").read()
exec(compile(source, "program.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
'''


@dataclass
class SandboxResult:
    """How a sandboxed run ended.

    status: "passed" (exit code 0), "failed" (the program raised or exited non-zero), "timeout" (wall clock
    or CPU limit), "error" (killed by a signal, e.g. the memory limit, or the sandbox itself failed).
    """

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    duration_s: float
    timed_out: bool = False
    memory_exceeded: bool = False
    signal: int | None = None
    isolation: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    @property
    def stderr_tail(self) -> str:
        """The last 20 lines of stderr (the exception of a failed program)."""
        return "\n".join(self.stderr.strip().splitlines()[-20:])

    @property
    def error(self) -> str:
        """One line saying what went wrong ("" when passed), like the original's `error` field."""
        if self.status == "passed":
            return ""
        if self.timed_out:
            return "Execution timed out"
        if self.memory_exceeded:
            return "Memory limit exceeded"
        lines = self.stderr.strip().splitlines()
        return lines[-1] if lines else f"exit code {self.returncode}, signal {self.signal}"


def _interpreter() -> str:
    """The base interpreter (a venv's python lives in a folder `nobody` may not be able to read)."""
    return getattr(sys, "_base_executable", None) or os.path.realpath(sys.executable)


def _user_process_count() -> int:
    uid, count = os.getuid(), 0
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    count += 1
            except OSError:
                pass
    return count


def _read_capped(path: Path, limit: int) -> str:
    with open(path, "rb") as f:
        data = f.read(limit)
    return data.decode("utf-8", errors="replace")


def run_python(code: str, timeout: float = DEFAULT_TIMEOUT, memory_bytes: int = DEFAULT_MEMORY, *,
               cpu_seconds: int | None = None, file_bytes: int = 16 * 1024 * 1024, max_processes: int = 16,
               disk_bytes: int = 64 * 1024 * 1024, namespaces: bool = True, drop_privileges: bool = True,
               output_limit: int = 1024 * 1024) -> SandboxResult:
    """Run `code` as `__main__` in a sandboxed interpreter (see the module docstring); never raises for
    anything the program does.

    timeout: wall-clock seconds before the process tree is killed; cpu_seconds: CPU limit (default: the
    timeout rounded up); memory_bytes: address-space limit; file_bytes: largest file (and captured output);
    max_processes: processes the program may have at once; disk_bytes: size of the private tmpfs;
    namespaces / drop_privileges: turn those layers off (tests, debugging).
    """
    if not isinstance(code, str):
        raise TypeError(f"code must be a string, got {type(code).__name__}")
    if timeout <= 0 or memory_bytes <= 0:
        raise ValueError(f"timeout and memory_bytes must be positive, got {timeout} and {memory_bytes}")
    start = time.monotonic()
    base = Path(tempfile.mkdtemp(prefix="nanochat-sandbox-"))
    workdir, capture = base / "work", base / "capture"
    workdir.mkdir()
    capture.mkdir()
    (workdir / "program.py").write_text(code, encoding="utf-8")
    root = os.geteuid() == 0
    if root and drop_privileges:  # the fallback path (no mount namespace) runs in this folder as nobody
        os.chmod(base, 0o711)
        os.chown(workdir, NOBODY, NOBODY)
        os.chown(workdir / "program.py", NOBODY, NOBODY)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(workdir), "TMPDIR": str(workdir), "LANG": "C.UTF-8",
           "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    status_r, status_w = os.pipe()
    config = {
        "workdir": str(workdir), "status_fd": status_w, "namespaces": namespaces and sys.platform == "linux",
        "drop_privileges": drop_privileges, "cpu_seconds": int(cpu_seconds or max(1, -(-timeout // 1))),
        "memory_bytes": int(memory_bytes), "file_bytes": int(file_bytes), "disk_bytes": int(disk_bytes),
        "max_processes": int(max_processes), "user_processes": 0 if root else _user_process_count(),
        "env": env, "bootstrap": _BOOTSTRAP, "nobody": NOBODY,
    }
    stdout_path, stderr_path = capture / "stdout", capture / "stderr"
    timed_out = False
    try:
        with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
            try:
                proc = subprocess.Popen([_interpreter(), "-I", "-S", "-c", _LAUNCHER, json.dumps(config)],
                                        stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=str(workdir),
                                        env=env, pass_fds=(status_w,), start_new_session=True)
            finally:
                os.close(status_w)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_tree(proc)
        with os.fdopen(status_r, "r") as f:
            reports = [json.loads(line) for line in f.read().splitlines() if line.strip().startswith("{")]
        stdout = _read_capped(stdout_path, output_limit)
        stderr = _read_capped(stderr_path, output_limit)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    duration = time.monotonic() - start
    isolation = next((r["applied"] for r in reports if "applied" in r), [])
    warnings = next((r["warnings"] for r in reports if "warnings" in r), [])
    exit_report = next((r for r in reports if "exit" in r or "signal" in r), None)
    sig = exit_report.get("signal") if exit_report else None
    code_ = exit_report.get("exit") if exit_report else None
    if exit_report is None and not timed_out:  # the launcher itself died
        if proc.returncode is not None and proc.returncode < 0:
            sig = -proc.returncode
        elif "pid-namespace" not in isolation:  # no namespace: the launcher exec'd into the program
            code_ = proc.returncode
    memory_exceeded = "MemoryError" in stderr
    cpu_limited = sig in (signal.SIGXCPU, signal.SIGKILL) and duration >= config["cpu_seconds"] * 0.9
    if timed_out or cpu_limited:
        status = "timeout"
        timed_out = True
    elif code_ == 0:
        status = "passed"
    elif code_ is not None:
        status = "failed"
    else:
        status = "error"
        if not stderr.strip():
            stderr = f"the sandboxed process was killed by signal {sig}" if sig else "the sandbox failed to start"
    return SandboxResult(status=status, returncode=code_, stdout=stdout, stderr=stderr, duration_s=duration,
                         timed_out=timed_out, memory_exceeded=memory_exceeded, signal=sig, isolation=isolation,
                         warnings=warnings)


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher's process group (the PID namespace dies with its first process)."""
    for kill in (lambda: os.killpg(proc.pid, signal.SIGKILL), proc.kill):
        try:
            kill()
        except (ProcessLookupError, PermissionError):
            pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:  # pragma: no cover - a process stuck in the kernel
        pass


def run_many(programs: list[str], workers: int | None = None, **kwargs) -> list[SandboxResult]:
    """Run several programs concurrently (threads waiting on child processes); results in input order."""
    workers = workers or max(1, min(4, (os.cpu_count() or 2)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda code: run_python(code, **kwargs), programs))


# --------------------------------------------------------------------------- HumanEval (spec §9.2)
def humaneval_imports(prompt: str) -> str:
    """The leading import lines of a HumanEval prompt (stop at the first other non-blank, non-comment line)."""
    lines = []
    for line in prompt.splitlines():
        stripped = line.strip()
        if stripped.startswith(("import ", "from ")):
            lines.append(line)
        elif stripped and not stripped.startswith("#"):
            break
    return "\n".join(lines)


def extract_code(completion: str) -> str:
    """The first fenced code block of a completion (```python or bare ```), else the whole text, stripped."""
    import re

    match = re.search(r"```(?:python|py)?[^\n]*\n(.*?)```", completion, re.S)
    return (match.group(1) if match else completion).strip()


def humaneval_program(prompt: str, completion: str, test: str, entry_point: str, marker: str | None = None) -> str:
    """imports + code + test + check(entry_point), as the original assembles it. With `marker`, the program
    prints it after the check, so a completion that exits early with status 0 (`os._exit(0)`) cannot pass."""
    tail = f"\nprint({marker!r})\n" if marker else ""
    return f"{humaneval_imports(prompt)}\n\n{extract_code(completion)}\n\n{test}\ncheck({entry_point})\n{tail}"
