#!/usr/bin/env python3
"""One partitioned aioqueue queue on a local 3-master Redis Cluster: throughput, Redis CPU per
job on each master, and how evenly the masters share the commands.

    .venv/bin/python benchmarks/cluster.py [--jobs 30000] [--repeat 3] [--replicas 0]
                                           [--partitions 1,2,3] [--concurrency 100]

Starts its own cluster (``--masters`` masters, 3 by default, ``--replicas`` replicas each, none
by default: replicas would only take CPU from a small box; with them, only the masters' CPU is
reported) from ``redis-server`` and ``redis-cli --cluster create`` on free loopback ports, with
``--save "" --appendonly no``, once for all the runs. For each number of partitions P (1, 2,
3): FLUSHALL, one producer process bulk-enqueues ``--jobs`` no-op jobs into ``Queue(url,
name="bench", partitions=P)``, then P worker processes (``queue.worker(concurrency=100)``
each) drain them.
Reported per P (median of ``--repeat`` runs, the P values interleaved within each repeat):

* jobs/s from the first completion to the last, over all worker processes;
* worker CPU µs per job (all worker processes, first to last completion);
* each master's Redis CPU (``INFO cpu`` used_cpu_sys + used_cpu_user) per job, while enqueueing
  (the producer's whole life) and while draining (from the workers' start to 1 s after the last
  completion), and the sum over the masters: the per-job Redis cost of a capacity model;
* each master's share of the commands (``INFO commandstats``, housekeeping such as INFO, PING,
  CLUSTER excluded; commands run by scripts included), and the largest deviation from an even
  share among the masters that hold a partition.

Standard library only in this (parent) process, like run.py: the producer and the workers are
this file run again (``--role producer|worker``) by ``--python`` (default: the interpreter
running this script), with a snapshot of the working tree's ``aioqueue`` package first on
``PYTHONPATH`` (taken at start, as run.py does). run.py's workload W11 calls :func:`run_w11`.
The cluster start-up is a minimal copy of tests/deployments.py's ``ClusterDeployment``
(benchmarks do not import from tests/).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import queue
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

from common import (  # noqa: E402  (stdlib only, from this directory)
    PREFIX,
    REPO_ROOT,
    RESULTS_DIR,
    RUNNER_ENV,
    Resp,
    RespError,
    package_digest,
    snapshot_package,
)

if TYPE_CHECKING:
    from aioqueue import Context

HOST = "127.0.0.1"
QUEUE = "bench"
CHUNK = 10_000  # jobs per enqueue_many call (as runners/_base.py)
SLOTS = 16_384
DEFAULT_PARTITIONS = (1, 2, 3)
SETTLE_S = 1.0  # after the last completion, before reading Redis stats: the last acks land
PROGRESS_S = 0.2  # how often a worker process reports its count
# Commands that are not the queue's work: clients', replicas' and this script's own
# (the same set as tests/deployments.py's HOUSEKEEPING).
HOUSEKEEPING = frozenset(
    {"cluster", "info", "ping", "config", "command", "client", "hello", "readonly",
     "readwrite", "select", "role", "replconf", "psync", "sync", "asking", "auth", "echo"}
)  # fmt: skip
# Node ports come from here; each node's bus port (port + 10000) must be free too. Away from
# tests/deployments.py's range (15000-22700), so a test run beside this one is not disturbed.
PORT_RANGE = (23000, 27999)


# --------------------------------------------------------------------------- the cluster


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _free_cluster_ports(n: int) -> list[int]:
    """``n`` ports, each free with its bus port (port + 10000)."""
    low, high = PORT_RANGE
    candidates = list(range(low, high + 1))
    random.shuffle(candidates)
    ports = [p for p in candidates[:2000] if _bindable(p) and _bindable(p + 10_000)][:n]
    if len(ports) < n:
        raise SystemExit(f"no {n} free loopback ports in {low}-{high} (with bus ports)")
    return ports


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class LocalCluster:
    """A Redis Cluster on loopback: ``masters`` masters, ``replicas`` replicas each, made
    with ``redis-cli --cluster create`` (equal slot ranges), nothing kept on disk but the
    nodes.conf files in a temporary directory removed by :meth:`stop`."""

    def __init__(self, masters: int = 3, replicas: int = 0) -> None:
        server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
        if server is None or cli is None:
            raise SystemExit("redis-server and redis-cli must be on PATH")
        self.server, self.cli = server, cli
        self.replicas = replicas
        self.tmp = tempfile.mkdtemp(prefix="aioqueue-bench-cluster-")
        self.ports = _free_cluster_ports(masters * (1 + replicas))
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.clients: dict[int, Resp] = {}
        self.masters: list[int] = []  # ports, ordered by their first slot
        self.ranges: list[tuple[int, int, int]] = []  # (first slot, last slot, port)

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"{HOST}:{port}" for port in self.masters)

    def start(self, timeout: float = 60.0) -> None:
        try:
            for port in self.ports:
                options = {
                    "port": port,
                    "bind": HOST,
                    "cluster-enabled": "yes",
                    "cluster-config-file": f"nodes-{port}.conf",
                    "cluster-node-timeout": 5000,
                    "save": "",
                    "appendonly": "no",
                    "dir": self.tmp,
                    "logfile": os.path.join(self.tmp, f"node-{port}.log"),
                }
                argv = [self.server]
                for name, value in options.items():
                    argv += [f"--{name}", str(value)]
                self.procs[port] = subprocess.Popen(
                    argv,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            deadline = time.monotonic() + timeout
            for port in self.ports:
                self.clients[port] = self._connect(port, deadline)
            create = [self.cli, "--cluster", "create", *(f"{HOST}:{p}" for p in self.ports)]
            create += ["--cluster-replicas", str(self.replicas), "--cluster-yes"]
            proc = subprocess.run(create, capture_output=True, text=True, timeout=timeout)
            if proc.returncode != 0:
                raise SystemExit(
                    f"redis-cli --cluster create failed:\n{proc.stdout[-2000:]}{proc.stderr}"
                )
            self._wait_healthy(deadline)
        except BaseException:
            self.stop()
            raise

    def _connect(self, port: int, deadline: float) -> Resp:
        while True:
            try:
                client = Resp(port)
                if client("PING") == "PONG":
                    return client
                client.close()
            except (OSError, RespError):
                pass
            if time.monotonic() > deadline or self.procs[port].poll() is not None:
                raise SystemExit(f"redis-server on {HOST}:{port} did not start (see {self.tmp})")
            time.sleep(0.05)

    def _nodes(self, port: int) -> list[tuple[int, bool, list[tuple[int, int]]]]:
        """``CLUSTER NODES`` as the node on ``port`` sees it: (port, is master, slot ranges)."""
        nodes = []
        for line in _text(self.clients[port]("CLUSTER", "NODES")).splitlines():
            fields = line.split()
            if len(fields) < 8:
                continue
            node_port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
            ranges = []
            for item in fields[8:]:
                if item.startswith("["):
                    continue  # a slot being migrated or imported
                first, _, last = item.partition("-")
                ranges.append((int(first), int(last or first)))
            nodes.append((node_port, "master" in fields[2].split(","), ranges))
        return nodes

    def _wait_healthy(self, deadline: float) -> None:
        """Until every node says ``cluster_state:ok`` and all agree on who serves which
        slots, and those slots cover the 16,384."""
        while True:
            views = set()
            healthy = True
            for port in self.ports:
                info = _text(self.clients[port]("CLUSTER", "INFO"))
                if "cluster_state:ok" not in info:
                    healthy = False
                    break
                view = tuple(
                    sorted((p, tuple(r)) for p, is_master, r in self._nodes(port) if is_master)
                )
                views.add(view)
            if healthy and len(views) == 1:
                (view,) = views
                ranges = sorted(
                    (first, last, port) for port, spans in view for first, last in spans
                )
                if sum(last - first + 1 for first, last, _ in ranges) == SLOTS:
                    self.ranges = ranges
                    firsts: dict[int, int] = {}
                    for first, _, port in ranges:
                        firsts.setdefault(port, first)
                    self.masters = sorted(firsts, key=lambda p: firsts[p])
                    return
            if time.monotonic() > deadline:
                raise SystemExit(f"the cluster did not become healthy (see {self.tmp})")
            time.sleep(0.1)

    def owner(self, slot: int) -> int:
        """The port of the master that serves ``slot``."""
        for first, last, port in self.ranges:
            if first <= slot <= last:
                return port
        raise KeyError(slot)

    def keyslot(self, key: str) -> int:
        return int(self.clients[self.masters[0]]("CLUSTER", "KEYSLOT", key))

    def flushall(self) -> None:
        for port in self.masters:
            self.clients[port]("FLUSHALL")

    def reset_stats(self) -> None:
        for port in self.ports:
            self.clients[port]("CONFIG", "RESETSTAT")

    def cpu(self) -> list[float]:
        """Each master's CPU seconds (used_cpu_sys + used_cpu_user) since it started."""
        out = []
        for port in self.masters:
            info = self.clients[port].info("cpu")
            out.append(float(info["used_cpu_sys"]) + float(info["used_cpu_user"]))
        return out

    def command_counts(self) -> list[int]:
        """Each master's commands since the last :meth:`reset_stats`, housekeeping excluded."""
        out = []
        for port in self.masters:
            raw = _text(self.clients[port]("INFO", "commandstats"))
            calls = 0
            for line in raw.splitlines():
                if not line.startswith("cmdstat_"):
                    continue
                name, _, stats = line.partition(":")
                if name.removeprefix("cmdstat_").split("|")[0].lower() in HOUSEKEEPING:
                    continue
                fields = dict(kv.split("=", 1) for kv in stats.split(",") if "=" in kv)
                calls += int(fields.get("calls", 0))
            out.append(calls)
        return out

    def dbsizes(self) -> list[int]:
        return [int(self.clients[port]("DBSIZE")) for port in self.masters]

    def version(self) -> str:
        return self.clients[self.ports[0]].info("server").get("redis_version", "?")

    def stop(self) -> None:
        for client in self.clients.values():
            client.close()
        self.clients.clear()
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- child processes


class Child:
    """This file run as a producer or worker process; its ``@@bench`` lines arrive on a queue
    (a worker's ``progress`` lines only update :attr:`count`), commands go to its stdin."""

    def __init__(self, python: str, env: dict[str, str], args: Sequence[str]) -> None:
        self.stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115  (closed in kill())
        self.proc = subprocess.Popen(
            [python, str(Path(__file__).resolve()), *args],
            cwd=BENCH_DIR,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            start_new_session=True,
        )
        self.count = 0
        self.log: list[str] = []  # its stderr lines, kept by kill()
        self.events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if not line.startswith(PREFIX):
                continue
            with contextlib.suppress(ValueError):
                event = json.loads(line[len(PREFIX) :])
                if event.get("event") == "progress":
                    self.count = int(event["count"])
                else:
                    self.events.put(event)
        self.events.put(None)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(OSError):
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()

    def wait_event(self, name: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return {"status": "timeout", "error": f"no {name} in {timeout:.0f}s"}
            try:
                event = self.events.get(timeout=left)
            except queue.Empty:
                continue
            if event is None:
                self.proc.wait()
                return {"status": "error", "error": f"exit {self.proc.returncode}"}
            if event.get("event") == name:
                return event

    def kill(self) -> None:
        """Kill the process group (if still running), keep its stderr in :attr:`log`."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        if not self.stderr.closed:
            with contextlib.suppress(OSError, ValueError):
                self.stderr.seek(0)
                self.log = [ln.rstrip() for ln in self.stderr.read().splitlines() if ln.strip()]
            self.stderr.close()


def _problems(children: Sequence[Child]) -> list[str]:
    """Warnings and errors the children logged (deduplicated, the last few)."""
    seen: list[str] = []
    for child in children:
        child.kill()
        for line in child.log:
            if line not in seen:
                seen.append(line)
    return [line[:300] for line in seen[-12:]]


# --------------------------------------------------------------------------- one run


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def _shares(values: Sequence[float], among: Sequence[int]) -> tuple[list[float], float]:
    """Each value's share of the total, and the largest deviation from an even share among
    the indexes ``among`` (share within them * len(among) - 1)."""
    total = sum(values)
    shares = [v / total if total else 0.0 for v in values]
    inside = sum(values[i] for i in among)
    dev = max((abs(values[i] / inside * len(among) - 1) for i in among), default=0.0)
    return shares, (dev if inside else 0.0)


def measure(
    cluster: LocalCluster,
    python: str,
    env: dict[str, str],
    jobs: int,
    partitions: int,
    procs: int,
    concurrency: int,
) -> dict[str, Any]:
    """One run: enqueue ``jobs`` no-op jobs into a queue of ``partitions`` partitions, then
    drain them with ``procs`` worker processes; figures per master in ``cluster.masters``
    order (by first slot)."""
    t0 = time.monotonic()
    run: dict[str, Any] = {
        "partitions": partitions,
        "procs": procs,
        "concurrency": concurrency,
        "jobs": jobs,
        "masters": list(cluster.masters),
    }
    cluster.flushall()
    cluster.reset_stats()
    cpu0 = cluster.cpu()
    common = ["--url", cluster.url, "--jobs", str(jobs), "--partitions", str(partitions)]
    producer = Child(python, env, ["--role", "producer", *common])
    children = [producer]
    workers: list[Child] = []
    try:
        pres = producer.wait_event("result", 60 + jobs / 500)
        producer.kill()
        if pres.get("status") != "ok":
            return _failed(run, "producer", pres, children, t0)
        cpu1, cmds1 = cluster.cpu(), cluster.command_counts()
        tags: list[str] = pres["tags"]
        slots = [cluster.keyslot("{" + tag + "}") for tag in tags]
        placement = [cluster.owner(slot) for slot in slots]
        run.update(enqueue_rate=pres["rate"], tags=tags, slots=slots, placement=placement)
        # "M<i>": the master by slot order, comparable between clusters (run.py's W11)
        run["placed_on"] = [f"M{cluster.masters.index(port) + 1}" for port in placement]
        run["origin"] = pres.get("origin")
        worker_args = ["--role", "worker", *common, "--concurrency", str(concurrency)]
        workers = [Child(python, env, worker_args) for _ in range(procs)]
        children += workers
        for worker in workers:
            ready = worker.wait_event("ready", 60)
            if ready.get("status") not in (None, "ok"):
                return _failed(run, "worker start", ready, children, t0)
        cpu2 = cluster.cpu()
        for worker in workers:
            worker.send("go")
        deadline = time.monotonic() + 60 + jobs / 200
        status = "ok"
        while sum(w.count for w in workers) < jobs:
            if time.monotonic() > deadline:
                status = "timeout"
                break
            if not all(w.alive for w in workers):
                status = "error"
                break
            time.sleep(0.05)
        time.sleep(SETTLE_S)
        cpu3, cmds3, keys = cluster.cpu(), cluster.command_counts(), cluster.dbsizes()
        for worker in workers:
            worker.send("report")
        results = [w.wait_event("result", 30) for w in workers]
    finally:
        for child in children:
            child.kill()
    run["problems"] = _problems(children)
    run["wall_s"] = round(time.monotonic() - t0, 2)
    counts = [int(r.get("count", 0)) for r in results]
    run["count"] = sum(counts)
    run["per_process"] = counts
    if status != "ok" or any(r.get("status") != "ok" for r in results):
        bad = next((r for r in results if r.get("status") != "ok"), {})
        run["status"] = status if status != "ok" else bad.get("status", "error")
        run["error"] = (
            f"drain {run['status']}: {run['count']:,} of {jobs:,} jobs completed"
            + (f"; worker: {bad.get('error')}" if bad.get("error") else "")
            + (f"; stderr: {run['problems'][-1]}" if run["problems"] else "")
        )
        return run
    first = min(r["first"] for r in results if r.get("first") is not None)
    last = max(r["last"] for r in results if r.get("last") is not None)
    run["status"] = "ok"
    # how long after the first process's first completion the last process had its first
    run["start_skew_s"] = max(r["first"] for r in results if r.get("first") is not None) - first
    run["elapsed_s"] = last - first
    run["rate"] = run["count"] / (last - first) if last > first else None
    run["worker_cpu_us_per_job"] = sum(r.get("cpu_s", 0.0) for r in results) * 1e6 / jobs
    enq = [(b - a) * 1e6 / jobs for a, b in zip(cpu0, cpu1, strict=True)]
    drain = [(b - a) * 1e6 / jobs for a, b in zip(cpu2, cpu3, strict=True)]
    cmds_enq = cmds1
    cmds_drain = [b - a for a, b in zip(cmds1, cmds3, strict=True)]
    holders = sorted({cluster.masters.index(port) for port in placement})
    run.update(
        redis_enqueue_us_per_job=enq,
        redis_drain_us_per_job=drain,
        redis_us_per_job=sum(enq) + sum(drain),
        commands_enqueue=cmds_enq,
        commands_drain=cmds_drain,
        commands_per_job=sum(cmds3) / jobs,
        keys=keys,
        holders=holders,
    )
    run["share"], run["max_dev"] = _shares(cmds3, holders)
    run["share_drain"], run["max_dev_drain"] = _shares(cmds_drain, holders)
    cpu_all = [e + d for e, d in zip(enq, drain, strict=True)]
    run["cpu_share"], run["max_dev_cpu"] = _shares(cpu_all, holders)
    return run


def _failed(
    run: dict[str, Any], stage: str, res: dict[str, Any], children: Sequence[Child], t0: float
) -> dict[str, Any]:
    for child in children:
        child.kill()
    run["problems"] = _problems(children)
    run["status"] = res.get("status") or "error"
    tail = f"; stderr: {run['problems'][-1]}" if run["problems"] else ""
    run["error"] = f"{stage}: {res.get('error') or run['status']}{tail}"
    run["wall_s"] = round(time.monotonic() - t0, 2)
    return run


def describe(run: dict[str, Any]) -> str:
    if run.get("status") != "ok":
        return f"{run.get('status')}: {run.get('error')}"
    masters = " / ".join(f"{x:,.0f}" for x in run["redis_drain_us_per_job"])
    shares = " / ".join(f"{x:.1%}" for x in run["share"])
    return (
        f"{run['rate']:,.0f} jobs/s, enqueue {run['enqueue_rate']:,.0f}/s, worker CPU "
        f"{run['worker_cpu_us_per_job']:,.0f} µs/job, Redis drain µs/job {masters}, "
        f"Redis total {run['redis_us_per_job']:,.0f} µs/job, command share {shares} "
        f"(max dev {run['max_dev']:.1%}), partitions on {'/'.join(run['placed_on'])}, jobs "
        f"per process {run['per_process']}, first→last {run['elapsed_s']:.2f}s, start skew "
        f"{run['start_skew_s']:.2f}s [{run['wall_s']}s]"
    )


# --------------------------------------------------------------------------- summary, table


SCALARS = (
    "rate",
    "enqueue_rate",
    "worker_cpu_us_per_job",
    "redis_us_per_job",
    "commands_per_job",
    "max_dev",
    "max_dev_drain",
    "max_dev_cpu",
)
VECTORS = (
    "redis_enqueue_us_per_job",
    "redis_drain_us_per_job",
    "share",
    "share_drain",
    "cpu_share",
    "keys",
)


def summarize(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the ok runs of one partitions setting (per master: element by element,
    masters ordered by their first slot), and the worst deviation from even."""
    ok = [r for r in runs if r.get("status") == "ok"]
    out: dict[str, Any] = {"ok_runs": len(ok), "total_runs": len(runs)}
    if runs:
        for key in ("partitions", "procs", "concurrency"):
            out[key] = runs[0][key]
    if not ok:
        out["status"] = "error"
        out["error"] = next((r.get("error") for r in runs if r.get("error")), None)
        return out
    out["status"] = "ok"
    for key in SCALARS:
        values = [r[key] for r in ok if r.get(key) is not None]
        if values:
            out[key] = _median(values)
    for key in VECTORS:
        out[key] = [_median(column) for column in zip(*(r[key] for r in ok), strict=True)]
    out["worst_dev"] = max(r["max_dev"] for r in ok)
    out["worst_dev_drain"] = max(r["max_dev_drain"] for r in ok)
    out["worst_dev_cpu"] = max(r["max_dev_cpu"] for r in ok)
    out["holders"] = ok[0]["holders"]
    out["tags"] = ok[0]["tags"]
    out["placed_on"] = sorted({", ".join(r["placed_on"]) for r in ok})
    out["masters"] = [r["masters"] for r in ok]
    out["redis_enqueue_total"] = sum(out["redis_enqueue_us_per_job"])
    out["redis_drain_total"] = sum(out["redis_drain_us_per_job"])
    return out


def _num(x: float | None, fmt: str = "{:,.0f}") -> str:
    return "-" if x is None else fmt.format(x)


def _per_master(values: Sequence[float], fmt: str) -> str:
    return " / ".join(fmt.format(v) for v in values)


def render(summaries: Sequence[dict[str, Any]], masters: int = 3) -> list[str]:
    """The markdown table (one row per partitions setting), then the per-job Redis cost and
    the load balance of the largest setting."""
    names = " / ".join(f"M{i + 1}" for i in range(masters))
    lines = [
        f"| partitions | worker procs | jobs/s | enqueue/s | worker CPU µs/job "
        f"| Redis CPU µs/job draining, {names} | Redis CPU µs/job, all masters: enqueue + drain "
        f"= total | command share {names} | max dev. from even (holders) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summaries:
        head = f"| {s.get('partitions')} | {s.get('procs')} "
        if s["status"] != "ok":
            lines.append(head + f"| {s['status']} | | | | | | |")
            continue
        partial = "" if s["ok_runs"] == s["total_runs"] else f" ({s['ok_runs']}/{s['total_runs']})"
        lines.append(
            head
            + f"| {_num(s.get('rate'))}{partial} | {_num(s.get('enqueue_rate'))} "
            + f"| {_num(s.get('worker_cpu_us_per_job'))} "
            + f"| {_per_master(s['redis_drain_us_per_job'], '{:,.0f}')} "
            + f"| {s['redis_enqueue_total']:,.0f} + {s['redis_drain_total']:,.0f} "
            + f"= {s['redis_us_per_job']:,.0f} "
            + f"| {_per_master(s['share'], '{:.1%}')} "
            + f"| {s['max_dev']:.1%} (worst run {s['worst_dev']:.1%}) |"
        )
    ok = [s for s in summaries if s["status"] == "ok"]
    if not ok:
        return lines
    lines += [
        "",
        "M1..M3: the masters in slot order (M1 serves slot 0). Commands: INFO commandstats "
        "(commands run by scripts included; INFO, PING, CLUSTER, CONFIG, COMMAND... excluded), "
        "enqueue and drain together. Deviation: a master's share among the masters that hold "
        "a partition, times their number, minus 1.",
    ]
    one = next((s for s in ok if s["partitions"] == 1), None)
    if one is not None:
        cost = one["redis_us_per_job"]
        lines += [
            "",
            f"Per-job Redis cost (partitions=1, one master does all the work): "
            f"{one['redis_enqueue_total']:,.1f} µs enqueue + {one['redis_drain_total']:,.1f} µs "
            f"drain = {cost:,.1f} µs of Redis CPU per job ({one['commands_per_job']:.1f} "
            f"commands/job) → one master saturates near {1e6 / cost:,.0f} jobs/s.",
            f"One worker process (concurrency {one['concurrency']}, partitions=1): "
            f"{_num(one.get('rate'))} jobs/s, {one['worker_cpu_us_per_job']:,.0f} µs of worker "
            f"CPU per job → about {1e6 / one['worker_cpu_us_per_job']:,.0f} jobs/s per core.",
        ]
    for s in ok:
        if s["partitions"] == 1:
            continue
        lines.append(
            f"partitions={s['partitions']}: {s['redis_us_per_job']:,.1f} µs of Redis CPU per job "
            f"over all masters ({_per_master(s['redis_drain_us_per_job'], '{:,.1f}')} µs "
            f"draining, per master)."
        )
    top = max(ok, key=lambda s: s["partitions"])
    if top["partitions"] > 1:
        within = "within" if top["worst_dev"] <= 0.15 else "NOT within"
        lines += [
            "",
            f"Load balance, partitions={top['partitions']} (partitions #0.. placed on "
            f"{' | '.join(top['placed_on'])}; tags {', '.join(top['tags'])}):",
            f"- command share, enqueue + drain: {_per_master(top['share'], '{:.1%}')}; max "
            f"deviation from even {top['max_dev']:.1%} (median), {top['worst_dev']:.1%} (worst "
            f"run): {within} ±15%",
            f"- command share, drain only: {_per_master(top['share_drain'], '{:.1%}')}; max "
            f"deviation {top['max_dev_drain']:.1%} (worst {top['worst_dev_drain']:.1%})",
            f"- Redis CPU share, enqueue + drain: {_per_master(top['cpu_share'], '{:.1%}')}; "
            f"max deviation {top['max_dev_cpu']:.1%} (worst {top['worst_dev_cpu']:.1%})",
            f"- keys per master after the drain (results kept): "
            f"{_per_master(top['keys'], '{:,.0f}')}",
        ]
    return lines


# --------------------------------------------------------------------------- run.py's W11


def run_w11(python: str, env: dict[str, str], jobs: int, concurrency: int) -> dict[str, Any]:
    """One repeat of run.py's W11: a fresh 3-master cluster, partitions 1, 2 and 3 (as many
    worker processes), one run each. Flat ``<figure>_p<P>`` keys for run.py's medians; the
    runs themselves under ``cluster_runs``."""
    out: dict[str, Any] = {"cluster_runs": []}
    try:
        with LocalCluster() as cluster:
            for p in DEFAULT_PARTITIONS:
                run = measure(cluster, python, env, jobs, p, p, concurrency)
                out["cluster_runs"].append(run)
    except (SystemExit, OSError, RespError) as exc:
        return {**out, "status": "error", "error": f"cluster: {exc}"}
    bad = [r for r in out["cluster_runs"] if r.get("status") != "ok"]
    out["status"] = "ok" if not bad else bad[0].get("status", "error")
    if bad:
        out["error"] = f"partitions={bad[0]['partitions']}: {bad[0].get('error')}"
    for run in out["cluster_runs"]:
        if run.get("status") == "ok":
            for key in ("rate", "redis_us_per_job", "max_dev"):
                out[f"{key}_p{run['partitions']}"] = run[key]
    return out


W11_METRICS = tuple(
    f"{key}_p{p}" for p in DEFAULT_PARTITIONS for key in ("rate", "redis_us_per_job", "max_dev")
)


def describe_w11(run: dict[str, Any]) -> str:
    parts = []
    for r in run.get("cluster_runs", []):
        if r.get("status") == "ok":
            parts.append(
                f"p={r['partitions']}: {r['rate']:,.0f} jobs/s, Redis "
                f"{r['redis_us_per_job']:,.0f} µs/job, dev {r['max_dev']:.0%}"
            )
        else:
            parts.append(f"p={r.get('partitions')}: {r.get('status')}")
    if run.get("status") != "ok" and not parts:
        parts.append(f"{run.get('status')}: {run.get('error')}")
    return "; ".join(parts) + f" [{run.get('wall_s')}s]"


def render_w11(result: dict[str, Any]) -> list[str]:
    """run.py's section for W11: the table over every repeat's runs."""
    runs = [r for rep in result.get("runs", []) for r in rep.get("cluster_runs", [])]
    if not runs:
        return []
    summaries = [summarize([r for r in runs if r["partitions"] == p]) for p in DEFAULT_PARTITIONS]
    return [
        "",
        "W11 cluster (aioqueue): one queue of 1, 2, 3 partitions on a local 3-master cluster, "
        "as many worker processes; the cores of this machine cap the scaling",
        "",
        *render(summaries),
    ]


# --------------------------------------------------------------------------- child side


class _Stats:
    def __init__(self) -> None:
        self.count = 0
        self.first: float | None = None
        self.last: float | None = None
        self.cpu_first = 0.0
        self.cpu_last = 0.0

    def hit(self) -> None:
        now = time.monotonic()  # CLOCK_MONOTONIC: comparable between processes
        if self.count == 0:
            self.first = now
            self.cpu_first = time.process_time()
        self.last = now
        self.cpu_last = time.process_time()
        self.count += 1


def _emit(**payload: Any) -> None:
    sys.stdout.write(PREFIX + json.dumps(payload) + "\n")
    sys.stdout.flush()


async def _child(args: argparse.Namespace) -> None:
    import logging

    import aioqueue
    from aioqueue import Queue

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    partitions = int(args.partitions)
    stats = _Stats()
    queue = Queue(args.url, name=QUEUE, partitions=partitions, result_ttl=60)

    @queue.task(name="noop")
    async def noop(ctx: Context) -> None:
        stats.hit()

    if args.role == "producer":
        from aioqueue.partitions import partition_tags

        await queue.connected_broker()
        t0 = time.perf_counter()
        left = args.jobs
        while left > 0:
            batch = min(CHUNK, left)
            await queue.enqueue_many([noop.prepare() for _ in range(batch)])
            left -= batch
        elapsed = time.perf_counter() - t0
        await queue.close()
        _emit(
            event="result",
            status="ok",
            rate=args.jobs / elapsed,
            tags=list(partition_tags(QUEUE, partitions)),
            origin=aioqueue.__file__,
        )
        return

    loop = asyncio.get_running_loop()
    commands: asyncio.Queue[str] = asyncio.Queue()

    def read_stdin() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(commands.put_nowait, line.strip())
        loop.call_soon_threadsafe(commands.put_nowait, "eof")

    threading.Thread(target=read_stdin, daemon=True).start()
    worker = queue.worker(concurrency=args.concurrency)
    _emit(event="ready")
    if await commands.get() != "go":
        return
    running = asyncio.create_task(worker.run())

    async def progress() -> None:
        sent = -1
        while True:
            if stats.count != sent:
                sent = stats.count
                _emit(event="progress", count=sent)
            await asyncio.sleep(PROGRESS_S)

    reporter = asyncio.create_task(progress())
    command = asyncio.create_task(commands.get())
    await asyncio.wait({running, command}, return_when=asyncio.FIRST_COMPLETED)
    reporter.cancel()
    result: dict[str, Any] = {
        "event": "result",
        "status": "ok",
        "count": stats.count,
        "first": stats.first,
        "last": stats.last,
        "cpu_s": stats.cpu_last - stats.cpu_first,
    }
    if running.done():
        exc = running.exception()
        result.update(status="error", error=f"worker returned early: {exc!r}")
    _emit(**result)


def _child_main(args: argparse.Namespace) -> None:
    try:
        asyncio.run(_child(args))
    except BaseException as exc:
        traceback.print_exc()
        _emit(event="result", status="error", error=f"{type(exc).__name__}: {exc}"[:500])
        sys.stderr.flush()
        os._exit(1)
    sys.stderr.flush()
    os._exit(0)  # never wait for the worker's teardown


# --------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--jobs", type=int, default=30_000, help="jobs per run (default 30,000)")
    p.add_argument("--repeat", type=int, default=3, help="runs per figure; median reported")
    p.add_argument(
        "--partitions", default="1,2,3", help="comma list; as many worker processes each"
    )
    p.add_argument("--concurrency", type=int, default=100, help="per worker process")
    p.add_argument("--masters", type=int, default=3)
    p.add_argument("--replicas", type=int, default=0, help="replicas per master (default 0)")
    p.add_argument(
        "--python",
        default=sys.executable,
        help="interpreter of the producer and worker processes (needs aioqueue's\n"
        "dependencies; aioqueue itself comes from a snapshot of the working tree)",
    )
    p.add_argument("--output", type=Path, default=RESULTS_DIR / "cluster.json")
    # child processes
    p.add_argument("--role", choices=["main", "producer", "worker"], default="main")
    p.add_argument("--url", default="")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    if args.role != "main":
        _child_main(args)
        return 0
    partitions = [int(x) for x in args.partitions.split(",") if x.strip()]
    load_start = os.getloadavg()
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="aioqueue-bench-")))
        tree = snapshot_package(tmp)
        path = [str(tmp), *filter(None, [RUNNER_ENV.get("PYTHONPATH")])]
        env = {**RUNNER_ENV, "PYTHONPATH": os.pathsep.join(path)}
        cluster = stack.enter_context(LocalCluster(args.masters, args.replicas))
        idle0 = cluster.cpu()
        time.sleep(1.0)
        idle = [(b - a) * 1e6 for a, b in zip(idle0, cluster.cpu(), strict=True)]
        print(
            f"[setup] cluster of {args.masters} masters ({args.replicas} replicas each), redis "
            f"{cluster.version()}, masters M1..M{args.masters} = {cluster.masters} (slot order); "
            f"idle Redis CPU {_per_master(idle, '{:,.0f}')} µs/s",
            flush=True,
        )
        runs: dict[int, list[dict[str, Any]]] = {p: [] for p in partitions}
        for rep in range(args.repeat):
            for p in partitions:
                run = measure(cluster, args.python, env, args.jobs, p, p, args.concurrency)
                if run.get("origin") and not run["origin"].startswith(str(tmp) + os.sep):
                    raise SystemExit(f"aioqueue was imported from {run['origin']}, not {tmp}")
                runs[p].append(run)
                print(f"  [p={p} {rep + 1}/{args.repeat}] {describe(run)}", flush=True)
                for line in run.get("problems", []):
                    print(f"      stderr: {line}", flush=True)
        version = cluster.version()
    summaries = [summarize(runs[p]) for p in partitions]
    load_end = os.getloadavg()
    changed = package_digest(REPO_ROOT / "aioqueue") != tree["sha256"]
    mods = tree.get("modified") or []
    header = [
        f"aioqueue cluster benchmark — "
        f"{dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')} — "
        f"{os.cpu_count()} cores, Python {platform.python_version()}, redis-server {version}",
        f"aioqueue: working tree at {(tree.get('head') or '?')[:12]}"
        + (f" + uncommitted changes to {len(mods)} files" if mods else "")
        + f", snapshot sha256 {tree['sha256'][:12]}"
        + ("; the tree changed during the run, measured: as at start" if changed else ""),
        f"{args.masters} masters, {args.replicas} replicas each, on loopback; {args.jobs:,} no-op "
        f"jobs per run, bulk-enqueued (enqueue_many, {CHUNK:,} per call) then drained by P "
        f"worker processes (concurrency {args.concurrency} each) for P partitions; "
        f"repeat={args.repeat} (median); load average at start/end: {load_start[0]:.2f} / "
        f"{load_end[0]:.2f}",
        f"NOTE: {os.cpu_count()} cores run the {args.masters} redis-servers, the worker processes "
        f"and the producer: absolute scaling (jobs/s against partitions) is capped by the cores "
        f"here and the box is shared, so jobs/s are noisy; CPU µs per job and the command "
        f"shares are the figures that carry over to real hosts.",
    ]
    table = render(summaries, args.masters)
    text = "\n".join([*header, "", *table])
    print("\n" + text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "header": header,
        "config": {
            "jobs": args.jobs,
            "repeat": args.repeat,
            "partitions": partitions,
            "concurrency": args.concurrency,
            "masters": args.masters,
            "replicas": args.replicas,
            "python": args.python,
        },
        "aioqueue_tree": tree,
        "idle_redis_cpu_us_per_s": idle,
        "summaries": summaries,
        "runs": runs,
    }
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    args.output.with_suffix(".md").write_text(text + "\n")
    print(f"\nwrote {args.output} and {args.output.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
