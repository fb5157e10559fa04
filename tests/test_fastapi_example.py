"""The FastAPI example (examples/fastapi_app) over httpx's ASGI transport, against real Redis.

Most tests run twice: once with the worker beside the app (``running(worker)``, standing in
for ``aioqueue run examples.fastapi_app.app:worker``) and once embedded in the app's lifespan.
httpx's ASGI transport does not run lifespans, so the tests enter the app's own.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import date, datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
from conftest import RedisServer
from fastapi import FastAPI
from helpers import ROOT, eventually, running

from aioqueue import Queue, Worker
from examples.fastapi_app.app import create_app, embedded_from_env
from examples.fastapi_app.tasks import (
    DAYS,
    DemoSource,
    ReportKind,
    ReportSummary,
    make_worker,
    summarize,
)

WAIT = 10.0
"""Seconds any single wait in these tests may take before it fails the test."""


class HeldSource(DemoSource):
    """The demo source, without latency; while ``hold`` is set each call waits for
    ``release``, so a job stays running until the test lets it go."""

    def __init__(self) -> None:
        super().__init__(latency=0.0)
        self.hold = False
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.closed = False

    async def daily_totals(self, user_id: int, kind: ReportKind, days: int) -> list[float]:
        if self.hold:
            self.started.set()
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        return await super().daily_totals(user_id, kind, days)

    async def aclose(self) -> None:
        self.closed = True


async def within(awaitable: Awaitable[Any]) -> Any:
    return await asyncio.wait_for(awaitable, WAIT)


@asynccontextmanager
async def serving(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """Run the app's lifespan and give a client that talks to the app in this process."""
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://testserver", timeout=30) as client,
    ):
        yield client


@pytest.fixture
def source() -> HeldSource:
    return HeldSource()


@pytest.fixture
def worker(queue: Queue, source: HeldSource) -> Worker:
    return make_worker(queue, source=lambda: source, concurrency=4)


@pytest.fixture(params=["separate", "embedded"])
async def client(
    request: pytest.FixtureRequest, queue: Queue, worker: Worker
) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the app with a worker: beside the app, or embedded in its lifespan."""
    embedded = request.param == "embedded"
    app = create_app(queue, embedded_worker=embedded, worker=worker)
    async with AsyncExitStack() as stack:
        client = await stack.enter_async_context(serving(app))
        if embedded:
            assert worker.started_at is not None  # the lifespan started it
        else:
            await stack.enter_async_context(running(worker))
        yield client


@pytest.fixture
async def idle_client(queue: Queue, worker: Worker) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the app while no worker runs (the separate worker is down)."""
    async with serving(create_app(queue, worker=worker)) as client:
        yield client


async def enqueue(client: httpx.AsyncClient, user_id: int = 42, kind: str = "billing") -> str:
    response = await client.post("/reports", json={"user_id": user_id, "kind": kind})
    assert response.status_code == 202, response.text
    job_id: str = response.json()["job_id"]
    return job_id


async def job_status(client: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    response = await client.get(f"/jobs/{job_id}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def has_status(
    client: httpx.AsyncClient, job_id: str, status: str
) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        current: str = (await job_status(client, job_id))["status"]
        return current == status

    return check


async def expected_report(user_id: int, kind: ReportKind) -> dict[str, Any]:
    totals = await DemoSource(latency=0).daily_totals(user_id, kind, DAYS)
    return _json_of(summarize(user_id, kind, totals, datetime.now(timezone.utc).date()))


def _json_of(summary: ReportSummary) -> dict[str, Any]:
    return {
        "user_id": summary.user_id,
        "kind": summary.kind,
        "days": summary.days,
        "total": summary.total,
        "daily_average": summary.daily_average,
        "peak": summary.peak,
        "peak_day": summary.peak_day.isoformat(),
    }


# -- enqueue, status, result --------------------------------------------------------------


async def test_post_enqueues_and_the_result_endpoint_returns_the_report(
    client: httpx.AsyncClient, queue: Queue
) -> None:
    response = await client.post("/reports", json={"user_id": 42, "kind": "billing"})

    assert response.status_code == 202, response.text
    body = response.json()
    job_id = body["job_id"]
    assert body == {
        "job_id": job_id,
        "status_url": f"http://testserver/jobs/{job_id}",
        "result_url": f"http://testserver/jobs/{job_id}/result",
    }
    assert response.headers["location"] == body["status_url"]

    result = await client.get(body["result_url"], params={"timeout": WAIT})
    assert result.status_code == 200, result.text
    report = result.json()
    generated_at = datetime.fromisoformat(report.pop("generated_at"))
    assert abs(generated_at - datetime.now(timezone.utc)) < timedelta(seconds=WAIT)
    assert report == await expected_report(42, "billing")
    assert report["days"] == DAYS
    assert date.fromisoformat(report["peak_day"]) < datetime.now(timezone.utc).date()

    # The typed handle sees the same result as the task's return type.
    summary = await queue.job(job_id, queue.tasks["build_report"]).result(timeout=WAIT)
    assert isinstance(summary, ReportSummary)
    assert summary.total == report["total"]


async def test_status_endpoint_follows_the_job_without_waiting(
    client: httpx.AsyncClient, source: HeldSource
) -> None:
    source.hold = True
    job_id = await enqueue(client, user_id=7, kind="activity")
    await within(source.started.wait())

    running = await job_status(client, job_id)
    assert running["status"] == "running"
    assert running["task"] == "build_report"
    assert running["attempt"] == 1
    assert running["enqueued_at"] is not None
    assert running["started_at"] is not None
    assert running["finished_at"] is None
    assert running["result"] is None
    assert running["error"] is None

    source.release.set()
    await eventually(has_status(client, job_id, "complete"), timeout=WAIT)

    done = await job_status(client, job_id)
    assert done["finished_at"] is not None
    assert done["error"] is None
    report = done["result"]
    report.pop("generated_at")
    assert report == await expected_report(7, "activity")


async def test_result_endpoint_answers_202_while_the_job_runs(
    client: httpx.AsyncClient, source: HeldSource
) -> None:
    source.hold = True
    job_id = await enqueue(client)
    await within(source.started.wait())

    pending = await client.get(f"/jobs/{job_id}/result", params={"timeout": 0.2})
    assert pending.status_code == 202, pending.text
    assert pending.json() == {
        "job_id": job_id,
        "status": "running",
        "detail": "not finished within 0.2s",
    }
    assert pending.headers["retry-after"] == "1"
    assert pending.headers["location"] == f"http://testserver/jobs/{job_id}/result?timeout=0.2"

    now = await client.get(f"/jobs/{job_id}/result", params={"timeout": 0})
    assert now.status_code == 202
    assert now.json()["status"] == "running"

    source.release.set()
    done = await client.get(pending.headers["location"].replace("0.2", str(WAIT)))
    assert done.status_code == 200, done.text
    assert done.json()["user_id"] == 42


async def test_a_failed_job_is_a_500_with_the_remote_error(client: httpx.AsyncClient) -> None:
    job_id = await enqueue(client, user_id=5000)  # DemoSource knows users 1..1000

    result = await client.get(f"/jobs/{job_id}/result", params={"timeout": WAIT})

    assert result.status_code == 500, result.text
    assert result.json() == {
        "error": "job failed",
        "detail": "no user with id 5000 (non-retryable error)",
        "job_id": job_id,
        "status": "failed",
        "error_type": "examples.fastapi_app.tasks.UserNotFound",
    }
    status = await job_status(client, job_id)
    assert status["status"] == "failed"
    assert status["attempt"] == 1  # UserNotFound is non-retryable: no second attempt
    assert status["error"] == {
        "type": "examples.fastapi_app.tasks.UserNotFound",
        "message": "no user with id 5000",
    }
    assert status["reason"] == "non-retryable error"
    assert status["result"] is None


async def test_unknown_jobs_are_404(idle_client: httpx.AsyncClient) -> None:
    for method, path in [
        ("GET", "/jobs/nope"),
        ("GET", "/jobs/nope/result?timeout=5"),
        ("POST", "/jobs/nope/abort"),
    ]:
        response = await within(idle_client.request(method, path))
        assert response.status_code == 404, (method, path, response.text)
        assert response.json() == {
            "detail": "job 'nope' does not exist (never enqueued, or expired)"
        }


# -- abort ----------------------------------------------------------------------------------


async def test_abort_cancels_a_running_job(
    client: httpx.AsyncClient, source: HeldSource, worker: Worker
) -> None:
    source.hold = True
    job_id = await enqueue(client)
    await within(source.started.wait())

    response = await client.post(f"/jobs/{job_id}/abort")

    assert response.status_code == 200, response.text
    assert response.json() == {
        "job_id": job_id,
        "previous_status": "running",
        "status": "aborted",
    }
    await within(source.cancelled.wait())
    await eventually(lambda: worker.in_flight == 0, timeout=WAIT)
    assert (await job_status(client, job_id))["status"] == "aborted"

    result = await client.get(f"/jobs/{job_id}/result", params={"timeout": WAIT})
    assert result.status_code == 409
    assert result.json()["error"] == "job aborted"

    again = await client.post(f"/jobs/{job_id}/abort")
    assert again.status_code == 409
    assert again.json()["status"] == "aborted"


async def test_abort_of_a_finished_job_is_409(client: httpx.AsyncClient) -> None:
    job_id = await enqueue(client)
    assert (await client.get(f"/jobs/{job_id}/result", params={"timeout": WAIT})).is_success

    response = await client.post(f"/jobs/{job_id}/abort")

    assert response.status_code == 409
    assert response.json() == {
        "error": "job already ended",
        "detail": "the job is complete; there is nothing to abort",
        "job_id": job_id,
        "status": "complete",
        "error_type": None,
    }


async def test_without_a_worker_jobs_wait_and_can_be_aborted(
    idle_client: httpx.AsyncClient, queue: Queue, worker: Worker
) -> None:
    job_id = await enqueue(idle_client)
    pending = await idle_client.get(f"/jobs/{job_id}/result", params={"timeout": 0.2})
    assert pending.status_code == 202
    assert pending.json()["status"] == "queued"
    assert (await job_status(idle_client, job_id))["started_at"] is None

    aborted = await idle_client.post(f"/jobs/{job_id}/abort")
    assert aborted.status_code == 200
    assert aborted.json()["previous_status"] == "queued"
    assert (await queue.counts()).ready == 0

    # A worker that starts later never runs it, and runs the next job.
    async with running(worker):
        later = await enqueue(idle_client)
        result = await idle_client.get(f"/jobs/{later}/result", params={"timeout": WAIT})
        assert result.status_code == 200
    assert (await job_status(idle_client, job_id))["status"] == "aborted"
    assert worker.completed == 1


# -- the request side -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        {"kind": "billing"},
        {"user_id": 1},
        {"user_id": 0, "kind": "billing"},
        {"user_id": "forty-two", "kind": "billing"},
        {"user_id": 1, "kind": "weather"},
        {"user_id": 1, "kind": "billing", "days": 7},
    ],
)
async def test_invalid_bodies_are_422_and_enqueue_nothing(
    idle_client: httpx.AsyncClient, queue: Queue, body: dict[str, Any]
) -> None:
    response = await idle_client.post("/reports", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["detail"]
    assert (await queue.counts()).ready == 0


@pytest.mark.parametrize("timeout", ["-1", "31", "soon"])
async def test_result_timeout_is_bounded(idle_client: httpx.AsyncClient, timeout: str) -> None:
    job_id = await enqueue(idle_client)
    response = await idle_client.get(f"/jobs/{job_id}/result", params={"timeout": timeout})
    assert response.status_code == 422


async def test_idempotency_key_returns_the_same_job(
    idle_client: httpx.AsyncClient, queue: Queue
) -> None:
    body = {"user_id": 3, "kind": "storage"}
    first = await idle_client.post("/reports", json=body, headers={"Idempotency-Key": "abc-1"})
    again = await idle_client.post("/reports", json=body, headers={"Idempotency-Key": "abc-1"})
    other = await idle_client.post("/reports", json=body, headers={"Idempotency-Key": "abc-2"})
    bad = await idle_client.post("/reports", json=body, headers={"Idempotency-Key": "a b"})

    assert first.status_code == again.status_code == other.status_code == 202
    assert first.json()["job_id"] == again.json()["job_id"] == "report-abc-1"
    assert other.json()["job_id"] == "report-abc-2"
    assert bad.status_code == 422
    assert (await queue.counts()).ready == 2


async def test_a_full_queue_is_503_with_retry_after(
    redis_server: RedisServer, queue_name: str
) -> None:
    queue = Queue(redis_server.url, name=queue_name, max_size=1)
    async with serving(create_app(queue)) as client:
        await enqueue(client)
        response = await client.post("/reports", json={"user_id": 2, "kind": "billing"})
    assert response.status_code == 503
    assert response.headers["retry-after"] == "30"
    assert response.json() == {"detail": "too many reports are waiting; retry later"}


async def test_openapi_documents_the_models(idle_client: httpx.AsyncClient) -> None:
    response = await idle_client.get("/openapi.json")
    assert response.status_code == 200
    schema = response.json()
    assert set(schema["paths"]) == {
        "/reports",
        "/jobs/{job_id}",
        "/jobs/{job_id}/result",
        "/jobs/{job_id}/abort",
    }
    assert {"ReportRequest", "ReportSummary", "JobView", "Pending", "Failure"} <= set(
        schema["components"]["schemas"]
    )


# -- the two deployments --------------------------------------------------------------------


async def test_the_embedded_worker_lives_and_dies_with_the_lifespan(
    queue: Queue, worker: Worker, source: HeldSource
) -> None:
    app = create_app(queue, embedded_worker=True, worker=worker)
    assert app.state.worker is worker
    async with serving(app) as client:
        assert worker.started_at is not None
        job_id = await enqueue(client)
        result = await client.get(f"/jobs/{job_id}/result", params={"timeout": WAIT})
        assert result.status_code == 200
    assert source.closed  # the worker's shutdown hook ran: it stopped with the app
    assert worker.completed == 1


async def test_a_separate_worker_is_not_started_by_the_app(queue: Queue, worker: Worker) -> None:
    async with serving(create_app(queue, worker=worker)) as client:
        await enqueue(client)
        assert worker.started_at is None
    assert (await queue.counts()).ready == 1


def test_embedded_worker_setting() -> None:
    assert embedded_from_env({}) is False
    for value in ["1", "true", "YES", " on "]:
        assert embedded_from_env({"REPORTS_EMBEDDED_WORKER": value}) is True
    for value in ["", "0", "false", "No", "off"]:
        assert embedded_from_env({"REPORTS_EMBEDDED_WORKER": value}) is False
    with pytest.raises(ValueError, match="REPORTS_EMBEDDED_WORKER"):
        embedded_from_env({"REPORTS_EMBEDDED_WORKER": "sometimes"})


def test_create_app_refuses_a_worker_of_another_queue(queue: Queue) -> None:
    other = Queue(queue.settings.redis_url, name=f"{queue.name}-other")
    with pytest.raises(ValueError, match="another queue"):
        create_app(queue, worker=make_worker(other))


@pytest.mark.slow
async def test_the_worker_runs_as_its_own_process(
    redis_server: RedisServer, queue_name: str, queue: Queue
) -> None:
    """``aioqueue run examples.fastapi_app.app:worker`` from the repository root, as in the
    README: the app enqueues, the worker process (in burst mode) runs the job and exits."""
    async with serving(create_app(queue)) as client:
        job_id = await enqueue(client, user_id=11, kind="storage")
        process = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "aioqueue", "run", "examples.fastapi_app.app:worker", "--burst"],
            cwd=ROOT,
            env={
                "PATH": "/usr/bin:/bin",
                "AIOQUEUE_REDIS_URL": redis_server.url,
                "AIOQUEUE_QUEUE": queue_name,
            },
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert process.returncode == 0, process.stdout + process.stderr
        result = await client.get(f"/jobs/{job_id}/result", params={"timeout": 0})
    assert result.status_code == 200, result.text
    report = result.json()
    report.pop("generated_at")
    assert report == await expected_report(11, "storage")
