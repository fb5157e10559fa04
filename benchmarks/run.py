#!/usr/bin/env python3
"""Compare aioqueue with its peers (arq, SAQ, streaq, taskiq) on one private Redis.

    python benchmarks/run.py [--libs aioqueue,arq,...] [--workloads W1,W3] [--repeat 3]
                             [--jobs 1.0] [--skip-install] [--reinstall] [--baseline REV]

Starts its own ``redis-server`` on a free loopback port (``--save "" --appendonly no``), creates
per-library venvs under ``benchmarks/.venvs/<lib>`` when missing, runs every figure ``--repeat``
times (FLUSHALL before each run) and reports the median as a markdown table on stdout, plus
``benchmarks/results/latest.json`` and ``latest.md``. ``--baseline REV`` also measures aioqueue as
of git revision REV (row ``aioqueue@REV``), interleaved with the working tree's aioqueue.
See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    LIBS,
    PEERS,
    REPO_ROOT,
    RESULTS_DIR,
    RedisServer,
    Runner,
    Target,
    check_runner,
    ensure_venv,
    git_worktree,
    package_digest,
    resolve_rev,
    snapshot_package,
    venv_python,
    versions,
)

CONCURRENCY = 100
SLEEP_S = 0.01
W2_IDEAL = CONCURRENCY / SLEEP_S  # 10,000 jobs/s


@dataclass(frozen=True)
class Workload:
    name: str
    base_jobs: int
    title: str
    libs: tuple[str, ...] | None = None  # None: every selected library


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload("W1", 20_000, "no-op: bulk enqueue, then one worker; first→last completion"),
        Workload("W2", 5_000, "I/O-bound: asyncio.sleep(0.01), concurrency 100 (ideal 10,000/s)"),
        Workload("W3", 500, "latency: idle worker, one job every 5 ms, start - enqueue"),
        Workload("W4", 5_000, "sequential `await enqueue` rate, no worker"),
        Workload(
            "W5", 20_000, "ceiling: bare redis-py XADD / XREADGROUP+XACK+XDEL+SET", ("ceiling",)
        ),
        Workload("W6", 1_000_000, "soak: 1M no-op jobs through one aioqueue worker", ("aioqueue",)),
        Workload(
            "W7",
            20_000,
            "workflow: a group of 19,999 no-op members and a fan-in callback, then one worker",
            ("aioqueue",),
        ),
        Workload("W8", 1_000, "workflow: a chain of 1,000 steps, one worker", ("aioqueue",)),
        Workload(
            "W9",
            20_000,
            "flow control: W1 through one worker consuming 3 queues (strict order)",
            ("aioqueue",),
        ),
        Workload(
            "W10",
            20_000,
            "flow control: W1 for a task with a rate limit far above the rate reached",
            ("aioqueue",),
        ),
        Workload(
            "W11",
            30_000,
            "cluster: one queue, partitions 1,2,3 on a 3-master local cluster",
            ("aioqueue",),
        ),
    )
}
WORKFLOWS = ("W7", "W8")  # aioqueue only, and not measured on a --baseline without them
FLOW_CONTROL = ("W9", "W10")  # aioqueue only, likewise
CLUSTER = ("W11",)  # aioqueue only, likewise; on a Redis Cluster of its own (cluster.py)
DEFAULT_LIBS = ("aioqueue", *PEERS)
DEFAULT_WORKLOADS = ("W1", "W2", "W3", "W4", "W5")


def scaled(base: int, factor: float, minimum: int = 10) -> int:
    return max(minimum, round(base * factor))


# --------------------------------------------------------------------------- one run each


def _fail(stage: str, res: dict[str, Any]) -> dict[str, Any]:
    status = res.get("status") or "error"
    return {"status": status, "error": f"{stage}: {res.get('error') or status}"}


def run_throughput(srv: RedisServer, t: Target, wl: str, n: int) -> dict[str, Any]:
    """W1/W2/W5: enqueue everything (bulk where available), then start one worker."""
    srv.flushall()
    prod = Runner(t, "producer", wl, srv.url, n, timeout=60 + n / 500)
    pres = prod.result()
    if pres.get("status") != "ok":
        return _fail("producer", pres)
    redis_cpu0 = srv.cpu_seconds()
    work = Runner(t, "worker", wl, srv.url, n, timeout=60 + n / 200)
    wres = work.result()
    redis_cpu = srv.cpu_seconds() - redis_cpu0
    run: dict[str, Any] = {
        "status": wres.get("status") or "error",
        "enqueue_rate": pres["rate"],
        "bulk": pres["bulk"],
        "rate": wres.get("rate"),
        "count": wres.get("count"),
        "rss_start_kb": wres.get("rss_start_kb"),
        "rss_end_kb": wres.get("rss_end_kb"),
        "cpu_us_per_job": wres.get("cpu_us_per_job"),
        # redis-server CPU over the whole worker process lifetime (incl. start-up), per job
        "redis_cpu_us_per_job": redis_cpu * 1e6 / n,
    }
    if run["status"] != "ok":
        run["error"] = "worker: " + str(wres.get("error") or wres.get("stderr") or run["status"])
    if wl == "W2" and run["rate"]:
        run["pct_ideal"] = 100.0 * run["rate"] / W2_IDEAL
    return run


def _start_idle_worker(
    srv: RedisServer, t: Target, wl: str, n: int, timeout: float, settle: float, **kw: Any
) -> tuple[Runner, dict[str, Any] | None]:
    work = Runner(t, "worker", wl, srv.url, n, timeout=timeout, **kw)
    ready = work.wait_event("ready", 60)
    if ready.get("status") not in (None, "ok"):
        work.kill()
        return work, _fail("worker start", ready)
    time.sleep(settle)  # let it connect / create its consumer group and go idle
    return work, None


def run_latency(srv: RedisServer, t: Target, n: int, settle: float) -> dict[str, Any]:
    """W3: idle worker first; one job every 5 ms carrying time.time(); task records start - t0."""
    srv.flushall()
    work, err = _start_idle_worker(srv, t, "W3", n, settle + 90 + n * 0.02, settle)
    if err:
        return err
    prod = Runner(t, "producer", "W3", srv.url, n, timeout=60 + n * 0.02)
    pres = prod.result()
    if pres.get("status") != "ok":
        work.kill()
        return _fail("producer", pres)
    wres = work.result()
    lat = sorted(wres.get("latencies_ms") or [])
    run: dict[str, Any] = {"status": wres.get("status") or "error", "count": len(lat)}
    if run["status"] != "ok":
        run["error"] = "worker: " + str(wres.get("error") or run["status"])
    if len(lat) >= 2:
        q = statistics.quantiles(lat, n=100, method="inclusive")
        run.update(p50=q[49], p95=q[94], p99=q[98], max=lat[-1], mean=statistics.fmean(lat))
    return run


def run_enqueue(srv: RedisServer, t: Target, n: int) -> dict[str, Any]:
    """W4: sequential ``await enqueue`` of n no-op jobs, no worker running."""
    srv.flushall()
    pres = Runner(t, "producer", "W4", srv.url, n, timeout=60 + n / 100).result()
    if pres.get("status") != "ok":
        return _fail("producer", pres)
    return {"status": "ok", "rate": pres["rate"]}


def run_soak(srv: RedisServer, t: Target, n: int, settle: float, result_ttl: int) -> dict[str, Any]:
    """W6: n no-op jobs through one aioqueue worker (producer runs alongside, in bulk chunks)."""
    srv.flushall()
    mem_before = srv.used_memory()
    srv.client("CONFIG", "RESETSTAT")
    work, err = _start_idle_worker(srv, t, "W6", n, 300 + n / 200, settle, result_ttl=result_ttl)
    if err:
        return err
    mem_idle = srv.used_memory()
    prod = Runner(t, "producer", "W6", srv.url, n, timeout=120 + n / 500)
    pres = prod.result()
    if pres.get("status") != "ok":
        work.kill()
        return _fail("producer", pres)
    wres = work.result()
    mem_done = srv.used_memory()
    peak = int(srv.client.info("memory").get("used_memory_peak", 0))
    # Wait for the results to expire: result_ttl, then until DBSIZE stops moving.
    time.sleep(result_ttl)
    deadline = time.monotonic() + max(120, 4 * result_ttl)
    last, stable = -1, 0
    while time.monotonic() < deadline and stable < 3:
        time.sleep(2)
        size = srv.dbsize()
        stable = stable + 1 if size == last else 0
        last = size
    run: dict[str, Any] = {
        "status": wres.get("status") or "error",
        "jobs": n,
        "enqueue_rate": pres["rate"],
        "bulk": pres["bulk"],
        "rate": wres.get("rate"),
        "count": wres.get("count"),
        "cpu_us_per_job": wres.get("cpu_us_per_job"),
        "rss_before_kb": wres.get("rss_before_kb"),
        "rss_start_kb": wres.get("rss_start_kb"),
        "rss_end_kb": wres.get("rss_end_kb"),
        "redis_used_memory_before": mem_before,
        "redis_used_memory_idle_worker": mem_idle,
        "redis_used_memory_done": mem_done,
        "redis_used_memory_peak": peak,
        "redis_used_memory_after": srv.used_memory(),
        "redis_keys_after": srv.dbsize(),
        "result_ttl_s": result_ttl,
    }
    if run["status"] != "ok":
        run["error"] = "worker: " + str(wres.get("error") or run["status"])
    return run


def run_cluster(t: Target, n: int) -> dict[str, Any]:
    """W11: a 3-master Redis Cluster of its own (benchmarks/cluster.py), then one queue of
    1, 2 and 3 partitions, n jobs each, drained by as many worker processes."""
    import cluster  # only for W11: the other workloads never import it

    return cluster.run_w11(str(venv_python(t.lib)), t.env, n, CONCURRENCY)


# --------------------------------------------------------------------------- aggregation

METRICS = {
    "W1": ("rate", "enqueue_rate", "cpu_us_per_job", "redis_cpu_us_per_job"),
    "W2": ("rate", "pct_ideal", "cpu_us_per_job"),
    "W3": ("p50", "p95", "p99"),
    "W4": ("rate",),
    "W5": ("rate", "enqueue_rate", "cpu_us_per_job", "redis_cpu_us_per_job"),
    "W6": ("rate",),
    "W7": ("rate", "enqueue_rate", "cpu_us_per_job", "redis_cpu_us_per_job"),
    "W8": ("rate", "enqueue_rate", "cpu_us_per_job", "redis_cpu_us_per_job"),
    "W9": ("rate", "enqueue_rate", "cpu_us_per_job", "redis_cpu_us_per_job"),
    "W10": ("rate", "enqueue_rate", "cpu_us_per_job", "redis_cpu_us_per_job"),
    # cluster.W11_METRICS: per number of partitions p
    "W11": tuple(
        f"{key}_p{p}" for p in (1, 2, 3) for key in ("rate", "redis_us_per_job", "max_dev")
    ),
}


def aggregate(wl: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if r.get("status") == "ok"]
    out: dict[str, Any] = {"runs": runs, "ok_runs": len(ok), "total_runs": len(runs)}
    if not ok:
        statuses = {r.get("status", "error") for r in runs}
        out["status"] = "timeout" if statuses == {"timeout"} else "error"
        out["error"] = next((r.get("error") for r in runs if r.get("error")), None)
        return out
    out["status"] = "ok"
    out["median"] = {
        m: statistics.median(vals)
        for m in METRICS[wl]
        if (vals := [r[m] for r in ok if r.get(m) is not None])
    }
    if "bulk" in ok[0]:
        out["bulk"] = ok[0]["bulk"]
    return out


# --------------------------------------------------------------------------- report


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}"


def _cell(res: dict[str, Any] | None, fmt: Callable[[dict[str, Any]], str]) -> str:
    if res is None:
        return "-"
    if res.get("status") == "unavailable":
        return "n/a"
    if res.get("status") != "ok":
        return str(res.get("status"))
    text = fmt(res["median"])
    if res["ok_runs"] < res["total_runs"]:
        text += f" ({res['ok_runs']}/{res['total_runs']} ok)"
    return text


def render(report: dict[str, Any]) -> str:
    res = report["results"]
    libs = [label for label in report["config"]["rows"] if label in res]
    lines: list[str] = []
    if {"W1", "W2", "W3", "W4"} & set(report["config"]["workloads"]):
        lines += [
            "| library | W1 jobs/s | W1 enqueue/s | W2 jobs/s (% ideal) | W3 p50 / p95 / p99 ms "
            "| W4 enqueue/s |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        sequential = False
        for lib in libs:
            r = res[lib]
            w1 = r.get("W1")
            enq = _cell(w1, lambda m: _num(m.get("enqueue_rate")))
            if w1 and w1.get("status") == "ok" and not w1.get("bulk"):
                enq += " ¹"
                sequential = True
            w2 = _cell(
                r.get("W2"), lambda m: f"{_num(m.get('rate'))} ({m.get('pct_ideal', 0):.0f}%)"
            )
            w3 = _cell(r.get("W3"), lambda m: f"{m['p50']:.1f} / {m['p95']:.1f} / {m['p99']:.1f}")
            lines.append(
                f"| {lib} | {_cell(w1, lambda m: _num(m.get('rate')))} | {enq} | {w2} | {w3} "
                f"| {_cell(r.get('W4'), lambda m: _num(m.get('rate')))} |"
            )
        if sequential:
            lines += ["", "¹ no bulk enqueue API: W1 enqueue is a sequential `await enqueue` loop."]
    ceiling = res.get("ceiling", {}).get("W5")
    cost = [(lib, res[lib].get("W1")) for lib in libs] + [("W5 ceiling", ceiling)]
    cost = [(name, r) for name, r in cost if r is not None]
    if cost:
        lines += [
            "",
            "W1/W5 CPU cost per job (µs; less sensitive to other load on the box than jobs/s):",
            "",
            "| library | worker process CPU µs/job | redis-server CPU µs/job |",
            "|---|---:|---:|",
        ]
        for name, r in cost:
            lines.append(
                f"| {name} | {_cell(r, lambda m: _num(m.get('cpu_us_per_job')))} "
                f"| {_cell(r, lambda m: _num(m.get('redis_cpu_us_per_job')))} |"
            )
    if ceiling is not None:
        lines.append("")
        lines.append(
            f"**W5 ceiling** (bare redis-py loop, XADD pipelined → XREADGROUP COUNT 100 + "
            f"XACK + XDEL + SET per job, pipelined per batch): "
            f"{_cell(ceiling, lambda m: _num(m.get('rate')) + ' jobs/s')} "
            f"(XADD {_cell(ceiling, lambda m: _num(m.get('enqueue_rate')) + '/s')})"
        )
    w1 = {
        lib: r["W1"]["median"]["rate"]
        for lib, r in res.items()
        if r.get("W1", {}).get("status") == "ok" and "rate" in r["W1"]["median"]
    }
    peers = {lib: v for lib, v in w1.items() if lib in PEERS}
    if "W1" in report["config"]["workloads"]:
        lines.append("")
        if "aioqueue" in w1 and peers:
            best = max(peers, key=lambda k: peers[k])
            lines.append(
                f"- aioqueue W1 / best peer W1 ({best}): {w1['aioqueue'] / peers[best]:.2f}x"
            )
        else:
            lines.append("- aioqueue W1 / best peer W1: n/a")
        if "aioqueue" in w1 and ceiling and ceiling.get("status") == "ok":
            lines.append(
                f"- aioqueue W1 / W5 ceiling: {w1['aioqueue'] / ceiling['median']['rate']:.2f}"
            )
        else:
            lines.append("- aioqueue W1 / W5 ceiling: n/a")
        if peers and ceiling and ceiling.get("status") == "ok":
            best = max(peers, key=lambda k: peers[k])
            lines.append(
                f"- best peer W1 ({best}) / W5 ceiling: "
                f"{peers[best] / ceiling['median']['rate']:.2f}"
            )
    for lib in libs:
        soak = res[lib].get("W6")
        if soak is not None:
            lines.append("")
            lines.append(_render_soak(lib, soak))
    lines += _render_workflows(res.get("aioqueue", {}))
    lines += _render_flow_control(res.get("aioqueue", {}))
    lines += _render_cluster(res.get("aioqueue", {}))
    lines += _render_baseline(report)
    notes = []
    for lib, r in res.items():
        if r.get("unavailable"):
            notes.append(f"- {lib}: not benchmarked: {r['unavailable']}")
        for wl, x in sorted(r.items()):
            if isinstance(x, dict) and x.get("status") in ("error", "timeout"):
                notes.append(f"- {lib} {wl}: {x['status']}: {x.get('error')}")
    if notes:
        lines += ["", "Problems:", *notes]
    return "\n".join(lines).strip()


def _render_workflows(aioqueue: dict[str, Any]) -> list[str]:
    """W7/W8 next to W1 (plain jobs), when measured."""
    rows = [(wl, aioqueue.get(wl)) for wl in ("W1", *WORKFLOWS)]
    if not any(r is not None for wl, r in rows if wl in WORKFLOWS):
        return []
    names = {
        "W1": "20,000 plain jobs (W1)",
        "W7": "group of 19,999 + callback (W7)",
        "W8": "chain of 1,000 steps (W8)",
    }
    lines = [
        "",
        "Workflows (aioqueue): enqueue rate, then one worker's rate over all jobs of it",
        "",
        "| workload | enqueue jobs/s | run jobs/s | worker CPU µs/job | redis-server CPU µs/job |",
        "|---|---:|---:|---:|---:|",
    ]
    for wl, r in rows:
        if r is None:
            continue
        lines.append(
            f"| {names[wl]} | {_cell(r, lambda m: _num(m.get('enqueue_rate')))} "
            f"| {_cell(r, lambda m: _num(m.get('rate')))} "
            f"| {_cell(r, lambda m: _num(m.get('cpu_us_per_job')))} "
            f"| {_cell(r, lambda m: _num(m.get('redis_cpu_us_per_job')))} |"
        )
    w1, w7 = aioqueue.get("W1"), aioqueue.get("W7")
    if w1 and w7 and w1.get("status") == "ok" and w7.get("status") == "ok":
        lines += [
            "",
            f"- group enqueue time / enqueue_many time: "
            f"{w1['median']['enqueue_rate'] / w7['median']['enqueue_rate']:.2f}x",
            f"- group members run rate / plain jobs: "
            f"{w7['median']['rate'] / w1['median']['rate']:.2f}",
        ]
    w8 = aioqueue.get("W8")
    if w8 and w8.get("status") == "ok" and w8["median"].get("rate"):
        lines.append(f"- chain: {1000 / w8['median']['rate']:.2f} ms per step")
    return lines


def _render_flow_control(aioqueue: dict[str, Any]) -> list[str]:
    """W9/W10 next to W1: what several queues and a rate limit cost plain jobs."""
    w1 = aioqueue.get("W1")
    rows = [(wl, aioqueue.get(wl)) for wl in FLOW_CONTROL]
    if not any(r is not None for _, r in rows):
        return []
    names = {
        "W9": "W1 through one worker on 3 queues (W9)",
        "W10": "W1 with a rate limit far above the rate (W10)",
    }
    lines = [
        "",
        "Flow control (aioqueue): one worker's rate next to plain W1 (target: within 10%)",
        "",
        "| workload | run jobs/s | / W1 | worker CPU µs/job | redis-server CPU µs/job |",
        "|---|---:|---:|---:|---:|",
    ]
    base = w1["median"]["rate"] if w1 and w1.get("status") == "ok" else None
    for wl, r in rows:
        if r is None:
            continue
        ratio = "n/a"
        if base and r.get("status") == "ok" and r["median"].get("rate"):
            ratio = f"{r['median']['rate'] / base:.2f}"
        lines.append(
            f"| {names[wl]} | {_cell(r, lambda m: _num(m.get('rate')))} | {ratio} "
            f"| {_cell(r, lambda m: _num(m.get('cpu_us_per_job')))} "
            f"| {_cell(r, lambda m: _num(m.get('redis_cpu_us_per_job')))} |"
        )
    return lines


def _render_cluster(aioqueue: dict[str, Any]) -> list[str]:
    """W11, when measured: cluster.py's table over every repeat's runs."""
    w11 = aioqueue.get("W11")
    if w11 is None or not w11.get("runs"):
        return []
    import cluster

    return cluster.render_w11(w11)


def _render_soak(label: str, soak: dict[str, Any]) -> str:
    if soak.get("status") != "ok":
        return f"**W6 soak** ({label}): {soak.get('status')}: {soak.get('error')}"
    r = soak["runs"][0]

    def mb(x: int | None, unit: int) -> str:
        return "?" if x is None else f"{x / unit:.1f} MB"

    return (
        f"**W6 soak** ({label}, {r['jobs']:,} no-op jobs, result_ttl {r['result_ttl_s']} s): "
        f"{_num(r.get('rate'))} jobs/s; worker RSS {mb(r.get('rss_start_kb'), 1024)} → "
        f"{mb(r.get('rss_end_kb'), 1024)}; Redis used_memory "
        f"{mb(r['redis_used_memory_before'], 2**20)} before → "
        f"{mb(r['redis_used_memory_peak'], 2**20)} peak → "
        f"{mb(r['redis_used_memory_after'], 2**20)} after expiry "
        f"({r['redis_keys_after']} keys left)"
    )


# (workload, metric, figure, format) compared between the baseline and the working tree
COMPARED = (
    ("W1", "rate", "W1 jobs/s", "{:,.0f}"),
    ("W1", "enqueue_rate", "W1 enqueue/s", "{:,.0f}"),
    ("W1", "cpu_us_per_job", "W1 worker CPU µs/job", "{:,.1f}"),
    ("W1", "redis_cpu_us_per_job", "W1 redis-server CPU µs/job", "{:,.1f}"),
    ("W2", "rate", "W2 jobs/s", "{:,.0f}"),
    ("W3", "p50", "W3 p50 ms", "{:.2f}"),
    ("W3", "p95", "W3 p95 ms", "{:.2f}"),
    ("W3", "p99", "W3 p99 ms", "{:.2f}"),
    ("W4", "rate", "W4 enqueue/s", "{:,.0f}"),
    ("W6", "rate", "W6 jobs/s", "{:,.0f}"),
)


def _render_baseline(report: dict[str, Any]) -> list[str]:
    """The working tree's aioqueue against ``--baseline``: medians, run ranges, change."""
    base = report["config"].get("baseline")
    if not base:
        return []
    old = report["results"].get(base["label"], {})
    new = report["results"].get("aioqueue", {})

    def cell(r: dict[str, Any], metric: str, fmt: str) -> str:
        vals = [x[metric] for x in r["runs"] if x.get("status") == "ok" and x.get(metric)]
        spread = f" ({fmt.format(min(vals))} to {fmt.format(max(vals))})" if len(vals) > 1 else ""
        return fmt.format(r["median"][metric]) + spread

    lines = [
        "",
        f"aioqueue (working tree) vs {base['label']} (commit {base['commit'][:12]}), same runs "
        "interleaved: median (min to max); change = working tree / baseline - 1",
        "",
        f"| figure | {base['label']} | aioqueue | change |",
        "|---|---:|---:|---:|",
    ]
    for wl, metric, figure, fmt in COMPARED:
        a, b = old.get(wl), new.get(wl)
        if not (a and b and a.get("status") == "ok" and b.get("status") == "ok"):
            continue
        if not (a["median"].get(metric) and b["median"].get(metric)):
            continue
        change = b["median"][metric] / a["median"][metric] - 1
        lines.append(
            f"| {figure} | {cell(a, metric, fmt)} | {cell(b, metric, fmt)} | {change:+.1%} |"
        )
    return lines


def machine_info(srv: RedisServer) -> dict[str, Any]:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(
                (ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), ""
            )
    except OSError:
        pass
    try:
        redis_v = subprocess.run(
            ["redis-server", "--version"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except OSError:
        redis_v = srv.version()
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "redis_server": redis_v,
        # other processes on the box skew every figure: recorded so a noisy run is visible
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


# --------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--libs", default=",".join(DEFAULT_LIBS), help="comma list (default: all)")
    p.add_argument(
        "--workloads",
        default=",".join(DEFAULT_WORKLOADS),
        help="comma list of W1..W11 (default W1-W5; W6 soak, W7/W8 workflows, W9/W10 flow\n"
        "control and W11 cluster only when named)",
    )
    p.add_argument("--repeat", type=int, default=3, help="runs per figure; median reported")
    p.add_argument("--jobs", type=float, default=1.0, help="scale factor for every job count")
    p.add_argument("--skip-install", action="store_true", help="use the venvs as they are")
    p.add_argument("--reinstall", action="store_true", help="pip install again into the venvs")
    p.add_argument("--settle", type=float, default=2.0, help="idle seconds before W3/W6 enqueue")
    p.add_argument("--soak-result-ttl", type=int, default=5, help="W6: aioqueue result_ttl (s)")
    p.add_argument("--output", type=Path, default=RESULTS_DIR / "latest.json")
    p.add_argument(
        "--baseline",
        metavar="REV",
        help="also measure aioqueue at git revision REV (row aioqueue@REV), from a temporary\n"
        "git worktree, interleaved with the working tree's aioqueue",
    )
    args = p.parse_args()
    args.libs = [x.strip() for x in args.libs.split(",") if x.strip()]
    args.workloads = [x.strip().upper() for x in args.workloads.split(",") if x.strip()]
    for lib in args.libs:
        if lib not in LIBS or lib == "ceiling":
            p.error(f"unknown library {lib!r} (choose from {', '.join(DEFAULT_LIBS)})")
    for wl in args.workloads:
        if wl not in WORKLOADS:
            p.error(f"unknown workload {wl!r}")
    if args.baseline is not None and "aioqueue" not in args.libs and "W6" not in args.workloads:
        p.error("--baseline compares aioqueue versions: include aioqueue in --libs")
    return args


def libs_for(wl: str, libs: list[str]) -> list[str]:
    fixed = WORKLOADS[wl].libs
    return list(fixed) if fixed is not None else list(libs)


@dataclass(frozen=True)
class Aioqueue:
    """The aioqueue rows: the working tree (a snapshot taken at start), and the baseline."""

    current: Target
    tree: dict[str, Any]  # HEAD, modified files, sha256 of the snapshot
    baseline: Target | None = None


def targets_for(libs: list[str], aq: Aioqueue) -> list[Target]:
    """One target (result row) per library, and the baseline, if any, right before aioqueue."""
    targets: list[Target] = []
    for lib in libs:
        if lib == "aioqueue":
            targets += [aq.current] if aq.baseline is None else [aq.baseline, aq.current]
        else:
            targets.append(Target(lib, lib))
    return targets


def labels_for(libs: list[str], aq: Aioqueue) -> list[str]:
    return [t.label for t in targets_for(libs, aq)]


def main() -> int:
    args = parse_args()
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="aioqueue-bench-")))
        tree = snapshot_package(tmp)
        baseline = None
        if args.baseline is not None:
            commit = resolve_rev(args.baseline)
            checkout = stack.enter_context(git_worktree(commit))
            print(f"[setup] baseline {args.baseline} = {commit[:12]}, checked out in {checkout}")
            baseline = Target("aioqueue", f"aioqueue@{args.baseline}", checkout, commit)
        return bench(args, Aioqueue(Target("aioqueue", "aioqueue", tmp), tree, baseline))


def bench(args: argparse.Namespace, aq: Aioqueue) -> int:
    baseline = aq.baseline
    needed: list[str] = []
    for wl in args.workloads:
        if wl == "W6" and "aioqueue" not in args.libs:
            args.libs.append("aioqueue")
        for lib in libs_for(wl, args.libs):
            if lib not in needed:
                needed.append(lib)
    targets = {t.label: t for t in targets_for(needed, aq)}

    results: dict[str, dict[str, Any]] = {label: {} for label in targets}
    available: list[str] = []
    for label, target in targets.items():
        err = ensure_venv(target.lib, skip_install=args.skip_install, reinstall=args.reinstall)
        err = err or check_runner(target)
        if err:
            print(f"[setup] {label}: NOT benchmarked: {err}", flush=True)
            results[label]["unavailable"] = err
        else:
            available.append(label)
    lib_versions = {label: versions(targets[label]) for label in available}

    load1 = os.getloadavg()[0]
    if load1 > 0.5:
        print(f"[setup] warning: 1-min load average is {load1:.2f}; figures will be noisy")
    srv = RedisServer()
    print(f"[setup] private redis-server {srv.version()} on 127.0.0.1:{srv.port}", flush=True)
    report: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(srv),
        "versions": lib_versions,
        "config": {
            "libs": args.libs,
            "rows": labels_for(args.libs, aq),
            "aioqueue_tree": aq.tree if "aioqueue" in needed else None,
            "baseline": None
            if baseline is None
            else {"rev": args.baseline, "commit": baseline.commit, "label": baseline.label},
            "workloads": args.workloads,
            "repeat": args.repeat,
            "jobs_scale": args.jobs,
            "concurrency": CONCURRENCY,
            "job_counts": {
                wl: scaled(WORKLOADS[wl].base_jobs, args.jobs, 20 if wl == "W3" else 10)
                for wl in args.workloads
            },
        },
        "results": results,
    }
    width = max(9, *(len(label) for label in targets))
    try:
        for wl in args.workloads:
            n = report["config"]["job_counts"][wl]
            print(f"\n== {wl} ({n:,} jobs): {WORKLOADS[wl].title}", flush=True)
            labels = labels_for(libs_for(wl, args.libs), aq)
            if wl in (*WORKFLOWS, *FLOW_CONTROL, *CLUSTER) and baseline is not None:
                labels = [label for label in labels if label != baseline.label]
            for label in labels:
                if label not in available:
                    results[label][wl] = {"status": "unavailable"}
            labels = [label for label in labels if label in available]
            runs: dict[str, list[dict[str, Any]]] = {label: [] for label in labels}
            repeat = 1 if wl == "W6" else args.repeat
            # Every repeat runs each row once, so load from other processes hits all rows alike.
            for rep in range(repeat):
                for label in labels:
                    t = targets[label]
                    t0 = time.monotonic()
                    if wl in ("W1", "W2", "W5", *WORKFLOWS, *FLOW_CONTROL):
                        run = run_throughput(srv, t, wl, n)
                    elif wl == "W3":
                        run = run_latency(srv, t, n, args.settle)
                    elif wl == "W4":
                        run = run_enqueue(srv, t, n)
                    elif wl in CLUSTER:
                        run = run_cluster(t, n)
                    else:
                        run = run_soak(srv, t, n, args.settle, args.soak_result_ttl)
                    run["wall_s"] = round(time.monotonic() - t0, 2)
                    runs[label].append(run)
                    print(
                        f"  [{wl} {rep + 1}/{repeat}] {label:{width}s} {describe(wl, run)}",
                        flush=True,
                    )
            for label in labels:
                results[label][wl] = aggregate(wl, runs[label])
    finally:
        srv.stop()
    report["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]

    table = render(report)
    tree_note = ""
    if "aioqueue" in needed:
        tree_note = f"aioqueue: {describe_tree(aq.tree)}\n"
        if package_digest(REPO_ROOT / "aioqueue") != aq.tree["sha256"]:
            tree_note += (
                "aioqueue: the working tree changed during the run; measured: as at start\n"
            )
    if baseline is not None:
        tree_note += f"baseline: {baseline.label} = commit {baseline.commit}\n"
    header = (
        f"aioqueue benchmark — {report['date']} — {report['machine']['nproc']} cores, "
        f"Python {report['machine']['python']}, {report['machine']['redis_server']}\n"
        f"versions: {json.dumps(lib_versions)}\n"
        f"{tree_note}"
        f"repeat={args.repeat} (median), job counts: {report['config']['job_counts']}, "
        f"load average at start/end: {report['machine']['loadavg_at_start'][0]} / "
        f"{report['machine']['loadavg_at_end'][0]}\n"
    )
    print("\n" + header + "\n" + table)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    args.output.with_suffix(".md").write_text(header + "\n" + table + "\n")
    print(f"\nwrote {args.output} and {args.output.with_suffix('.md')}")
    return 0


def describe_tree(tree: dict[str, Any]) -> str:
    if tree["head"] is None:
        return f"working tree (not a git checkout), sha256 {tree['sha256'][:12]}"
    mods = tree["modified"]
    changes = f" + uncommitted changes to {', '.join(mods)}" if mods else " (clean)"
    return (
        f"working tree at {tree['head'][:12]}{changes}, as at start (sha256 {tree['sha256'][:12]})"
    )


def describe(wl: str, run: dict[str, Any]) -> str:
    if wl in CLUSTER:
        import cluster

        return cluster.describe_w11(run)
    if run.get("status") != "ok":
        return f"{run.get('status')}: {run.get('error')}"
    parts = []
    if "rate" in run and run["rate"] is not None:
        parts.append(f"{run['rate']:,.0f} {'enqueue/s' if wl == 'W4' else 'jobs/s'}")
    if "pct_ideal" in run:
        parts.append(f"{run['pct_ideal']:.0f}% of ideal")
    if "enqueue_rate" in run:
        parts.append(f"enqueue {run['enqueue_rate']:,.0f}/s" + ("" if run.get("bulk") else " seq"))
    if run.get("cpu_us_per_job") is not None:
        parts.append(f"worker CPU {run['cpu_us_per_job']:,.0f} µs/job")
    if run.get("redis_cpu_us_per_job") is not None:
        parts.append(f"redis CPU {run['redis_cpu_us_per_job']:,.0f} µs/job")
    if "p50" in run:
        parts.append(f"p50 {run['p50']:.1f} p95 {run['p95']:.1f} p99 {run['p99']:.1f} ms")
    parts.append(f"[{run['wall_s']}s]")
    return ", ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
