"""Harness helpers for benchmarks/run.py (stdlib only; runs on the system python).

* a private ``redis-server`` on a free loopback port and a tiny RESP client to drive it;
* per-library venvs under ``benchmarks/.venvs/<lib>``;
* a snapshot of the working tree's aioqueue package, and a temporary git worktree of an older
  revision for ``--baseline``;
* runner subprocesses (``python -m runners.<lib>``) and their ``@@bench`` JSON lines.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
VENVS_DIR = BENCH_DIR / ".venvs"
RESULTS_DIR = BENCH_DIR / "results"
PREFIX = "@@bench "
# Runner subprocesses must not leave __pycache__ in the repo's package (aioqueue is installed
# editable); the venvs' own packages were byte-compiled by pip already.
RUNNER_ENV = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}


@dataclass(frozen=True)
class LibSpec:
    name: str
    packages: tuple[str, ...]  # pip install arguments
    dists: tuple[str, ...]  # distributions whose versions are reported
    note: str = ""


LIBS: dict[str, LibSpec] = {
    spec.name: spec
    for spec in (
        LibSpec("aioqueue", ("-e", str(REPO_ROOT)), ("aioqueue", "redis", "hiredis", "msgspec")),
        LibSpec("arq", ("arq",), ("arq", "redis", "hiredis")),
        # saq 0.26.4 imports typing_extensions without declaring it (redis>=7 no longer pulls
        # it in), so it is installed alongside.
        LibSpec("saq", ("saq[redis]", "typing_extensions"), ("saq", "redis", "hiredis")),
        LibSpec("streaq", ("streaq",), ("streaq", "coredis", "anyio")),
        LibSpec(
            "taskiq", ("taskiq", "taskiq-redis"), ("taskiq", "taskiq-redis", "redis", "hiredis")
        ),
        # W5: the bare redis-py loop, with the same client stack aioqueue depends on.
        LibSpec("ceiling", ("redis[hiredis]",), ("redis", "hiredis")),
    )
}
PEERS = ("arq", "saq", "streaq", "taskiq")
INSTALL_MARKER = ".bench-installed"


@dataclass(frozen=True)
class Target:
    """What one row of results measures: ``runners/<lib>.py`` run by the python of ``lib``'s venv.

    With ``checkout``, that directory (a snapshot of the working tree's package, or a git
    worktree of ``commit`` for ``--baseline``) is put first on the runner's import path, so the
    library is imported from it instead of from the venv's install; everything else
    (interpreter, dependencies, runner) is the same.
    """

    lib: str
    label: str
    checkout: Path | None = None
    commit: str | None = None

    @property
    def env(self) -> dict[str, str]:
        if self.checkout is None:
            return RUNNER_ENV
        path = [str(self.checkout), *filter(None, [RUNNER_ENV.get("PYTHONPATH")])]
        return {**RUNNER_ENV, "PYTHONPATH": os.pathsep.join(path)}


def venv_python(lib: str) -> Path:
    return VENVS_DIR / lib / "bin" / "python"


def ensure_venv(lib: str, *, skip_install: bool, reinstall: bool) -> str | None:
    """Create/install the venv for ``lib``; return an error message or None."""
    spec = LIBS[lib]
    vdir = VENVS_DIR / lib
    py = venv_python(lib)
    marker = vdir / INSTALL_MARKER
    if skip_install:
        return None if py.exists() else "venv missing (run without --skip-install)"
    if marker.exists() and not reinstall:
        return None
    if not py.exists():
        VENVS_DIR.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(
            [sys.executable, "-m", "venv", str(vdir)], capture_output=True, text=True
        )
        if proc.returncode != 0:
            return f"venv creation failed: {_tail(proc.stderr)}"
    print(f"[setup] installing {lib}: pip install {' '.join(spec.packages)}", flush=True)
    proc = subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", *spec.packages],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode != 0:
        errors = [ln for ln in proc.stderr.splitlines() if not ln.startswith("WARNING:")]
        return f"pip install failed: {_tail(chr(10).join(errors), 3)}"
    marker.write_text(" ".join(spec.packages) + "\n")
    return None


def check_runner(target: Target) -> str | None:
    """Import the runner (and so the library) in its venv; return an error message or None.

    For a target with a checkout, also check that the library really is imported from it.
    """
    if target.checkout is not None:
        origin = _import_origin(target)
        if not origin.startswith(str(target.checkout) + os.sep):
            return f"{target.lib} is imported from {origin or '?'}, not from {target.checkout}"
    try:
        proc = subprocess.run(
            [str(venv_python(target.lib)), "-m", f"runners.{target.lib}", "--role", "check"],
            cwd=BENCH_DIR,
            env=target.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    except subprocess.TimeoutExpired:
        return "import timed out"
    if proc.returncode != 0:
        return f"import failed: {_tail(proc.stderr, 1)}"
    return None


def _import_origin(target: Target) -> str:
    code = "import importlib, sys; print(importlib.import_module(sys.argv[1]).__file__)"
    try:
        proc = subprocess.run(
            [str(venv_python(target.lib)), "-c", code, target.lib],
            cwd=BENCH_DIR,
            env=target.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    except subprocess.TimeoutExpired:
        return ""
    return proc.stdout.strip() if proc.returncode == 0 else ""


def versions(target: Target) -> dict[str, str | None]:
    code = (
        "import importlib.metadata as m, json, sys\n"
        "out = {}\n"
        "for d in sys.argv[1:]:\n"
        "    try:\n"
        "        out[d] = m.version(d)\n"
        "    except m.PackageNotFoundError:\n"
        "        out[d] = None\n"
        "print(json.dumps(out))\n"
    )
    try:
        proc = subprocess.run(
            [str(venv_python(target.lib)), "-c", code, *LIBS[target.lib].dists],
            capture_output=True,
            text=True,
            timeout=60,
        )
        out: dict[str, str | None] = json.loads(proc.stdout)
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return {}
    if target.commit is not None:  # the venv's metadata describes its own install, not this
        out[target.lib] = f"git {target.commit[:12]}"
    return out


def _tail(text: str, n: int = 2) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return " | ".join(lines[-n:])[:400]


# --------------------------------------------------------------------------- git


def _git(*args: str) -> str:
    proc = subprocess.run(
        ["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=120
    )
    if proc.returncode != 0:
        raise SystemExit(f"git {' '.join(args)} failed: {_tail(proc.stderr) or proc.returncode}")
    return proc.stdout.rstrip()  # not strip(): porcelain status lines start with a space


def resolve_rev(rev: str) -> str:
    """The full commit hash ``rev`` names in the repository (SystemExit if none)."""
    return _git("rev-parse", "--verify", "--end-of-options", f"{rev}^{{commit}}")


def snapshot_package(dest: Path) -> dict[str, Any]:
    """Copy the working tree's ``aioqueue`` package into ``dest`` (its import root).

    The ``aioqueue`` row runs this copy, so edits made to the tree while the benchmark runs
    cannot mix versions within a run. Returns the tree's HEAD, the package files modified
    beside it, and a fingerprint of the copy (None for the git fields outside a checkout).
    """
    try:
        head: str | None = _git("rev-parse", "HEAD")
        status = _git("status", "--porcelain", "--untracked-files=all", "--", "aioqueue")
        modified: list[str] | None = [ln[3:] for ln in status.splitlines()]
    except (SystemExit, OSError, subprocess.TimeoutExpired):
        head = modified = None
    shutil.copytree(
        REPO_ROOT / "aioqueue", dest / "aioqueue", ignore=shutil.ignore_patterns("__pycache__")
    )
    return {"head": head, "modified": modified, "sha256": package_digest(dest / "aioqueue")}


def package_digest(root: Path) -> str:
    """sha256 over the relative paths and contents of the files under ``root``."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


@contextlib.contextmanager
def git_worktree(commit: str) -> Iterator[Path]:
    """Check ``commit`` out (detached) into a temporary git worktree; remove it on exit.

    Touches neither the working tree nor the index of the repository itself.
    """
    tmp = Path(tempfile.mkdtemp(prefix="aioqueue-bench-baseline-"))
    path = tmp / f"aioqueue-{commit[:12]}"
    try:
        _git("worktree", "add", "--detach", "--quiet", str(path), commit)
        yield path
    finally:
        subprocess.run(
            ["git", "-C", str(REPO_ROOT), "worktree", "remove", "--force", str(path)],
            capture_output=True,
            timeout=120,
        )
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run(
            ["git", "-C", str(REPO_ROOT), "worktree", "prune"], capture_output=True, timeout=120
        )


# --------------------------------------------------------------------------- redis


class RespError(Exception):
    pass


class Resp:
    """Just enough RESP2 for FLUSHALL / INFO / DBSIZE / PING."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.file = self.sock.makefile("rb")

    def __call__(self, *args: str | int) -> Any:
        out = [f"*{len(args)}\r\n".encode()]
        for a in args:
            b = str(a).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(b), b))
        self.sock.sendall(b"".join(out))
        return self._read()

    def _read(self) -> Any:
        line = self.file.readline()
        if not line:
            raise ConnectionError("redis closed the connection")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RespError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self.file.read(n + 2)[:-2]
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._read() for _ in range(n)]
        raise RespError(f"unexpected reply {line!r}")

    def info(self, section: str) -> dict[str, str]:
        raw = self("INFO", section).decode()
        return dict(
            ln.split(":", 1) for ln in raw.splitlines() if ":" in ln and not ln.startswith("#")
        )

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
            self.sock.close()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A private, non-persistent redis-server on a free loopback port."""

    def __init__(self) -> None:
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            raise SystemExit("redis-server not found on PATH")
        self.tmp = tempfile.mkdtemp(prefix="aioqueue-bench-redis-")
        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.tmp,
                "--logfile",
                os.path.join(self.tmp, "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                self.client = Resp(self.port)
                if self.client("PING") == "PONG":
                    break
            except (OSError, RespError):
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise SystemExit("private redis-server did not start") from None
                time.sleep(0.05)
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def version(self) -> str:
        return self.client.info("server").get("redis_version", "?")

    def flushall(self) -> None:
        self.client("FLUSHALL")

    def used_memory(self) -> int:
        return int(self.client.info("memory")["used_memory"])

    def cpu_seconds(self) -> float:
        info = self.client.info("cpu")
        return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])

    def dbsize(self) -> int:
        return int(self.client("DBSIZE"))

    def stop(self) -> None:
        if getattr(self, "client", None) is not None:
            self.client.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)


# --------------------------------------------------------------------------- runners


@dataclass
class Runner:
    """One runner subprocess; its ``@@bench`` lines arrive on a queue via a reader thread."""

    target: Target
    role: str
    workload: str
    url: str
    jobs: int
    timeout: float
    result_ttl: int = 60
    events: queue.Queue[dict[str, Any] | None] = field(default_factory=queue.Queue)

    def __post_init__(self) -> None:
        # closed in kill(); lives as long as the subprocess
        self.stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                str(venv_python(self.target.lib)),
                "-m",
                f"runners.{self.target.lib}",
                "--role",
                self.role,
                "--workload",
                self.workload,
                "--url",
                self.url,
                "--jobs",
                str(self.jobs),
                "--result-ttl",
                str(self.result_ttl),
                # the runner reports a partial count itself a little before we kill it
                "--timeout",
                str(max(self.timeout - 10, self.timeout * 0.9)),
            ],
            cwd=BENCH_DIR,
            env=self.target.env,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            start_new_session=True,
        )
        self.started = time.monotonic()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(PREFIX):
                with contextlib.suppress(ValueError):
                    self.events.put(json.loads(line[len(PREFIX) :]))
        self.events.put(None)  # EOF

    def wait_event(self, name: str, timeout: float | None = None) -> dict[str, Any]:
        """Wait for an event line; returns a result-shaped dict on timeout/crash."""
        budget = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + budget
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                err = f"no {name} in {budget:.0f}s; stderr: {self.stderr_tail()}"
                self.kill()
                return {"event": name, "status": "timeout", "error": err}
            try:
                ev = self.events.get(timeout=left)
            except queue.Empty:
                continue
            if ev is None:
                self.proc.wait()
                return {
                    "event": name,
                    "status": "error",
                    "error": f"exit {self.proc.returncode}: {self.stderr_tail()}",
                }
            if ev.get("event") == name:
                if ev.get("status") not in (None, "ok") and "stderr" not in ev:
                    ev["stderr"] = self.stderr_tail()
                return ev

    def result(self) -> dict[str, Any]:
        left = self.timeout - (time.monotonic() - self.started)
        res = self.wait_event("result", max(left, 1.0))
        self.kill()
        return res

    def stderr_tail(self) -> str:
        with contextlib.suppress(OSError, ValueError):
            self.stderr.seek(0)
            return _tail(self.stderr.read(), 2)
        return ""

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        with contextlib.suppress(OSError):
            self.stderr.close()
