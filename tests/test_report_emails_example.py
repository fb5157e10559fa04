"""The report-emails example (examples/report_emails): a workflow over the web app.

Against the suite's redis-server and a fake SMTP server (aiosmtpd) on a free local port, with
the worker embedded in the app's lifespan; httpx's ASGI transport does not run lifespans, so
the tests enter the app's own. Reports are posted through ``POST /reports`` and watched
through ``GET /reports/{id}``, the job event stream and the SMTP server's inbox.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import httpx
import pytest
from conftest import RedisServer
from helpers import ROOT
from starlette.applications import Starlette

from aioqueue import (
    JobEvent,
    JobProgress,
    JobStatus,
    MemberFailure,
    Queue,
    Worker,
)
from examples.report_emails.app import create_app
from examples.report_emails.smtp import FakeSMTPServer
from examples.report_emails.tasks import (
    Delivery,
    DeliverySummary,
    FailedDelivery,
    Renderer,
    ReportJobs,
    ReportTasks,
    SmtpConfig,
    make_worker,
    register,
)

pytestmark = pytest.mark.timeout(60)

WAIT = 15.0
"""Seconds any single wait in these tests may take before it fails the test."""

T = TypeVar("T")

_FINAL = frozenset({"completed", "failed", "dead", "aborted"})


class HeldRenderer(Renderer):
    """Four sections without delay; with ``hold_at`` set, rendering that section waits for
    ``release``, so the report stays half rendered until the test lets it go."""

    def __init__(self) -> None:
        super().__init__(sections=4, seconds_per_section=0)
        self.hold_at: int | None = None
        self.held = asyncio.Event()
        self.release = asyncio.Event()

    async def render_section(self, report_id: str, index: int) -> int:
        if index == self.hold_at:
            self.held.set()
            await self.release.wait()
        return await super().render_section(report_id, index)


async def within(awaitable: Awaitable[T]) -> T:
    return await asyncio.wait_for(awaitable, WAIT)


@asynccontextmanager
async def serving(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    """Run the app's lifespan and give a client that talks to the app in this process."""
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://testserver", timeout=30) as client,
    ):
        yield client


@pytest.fixture
async def queue(redis_server: RedisServer, queue_name: str) -> AsyncIterator[Queue]:
    made = Queue(redis_server.url, name=queue_name)
    yield made
    await made.purge()
    await made.close()


@pytest.fixture
async def smtp() -> AsyncIterator[FakeSMTPServer]:
    async with FakeSMTPServer() as server:  # port 0: a free one
        yield server


@pytest.fixture
def renderer() -> HeldRenderer:
    return HeldRenderer()


@pytest.fixture
def tasks(queue: Queue) -> ReportTasks:
    return register(queue)


@pytest.fixture
def worker(
    queue: Queue, tasks: ReportTasks, smtp: FakeSMTPServer, renderer: HeldRenderer
) -> Worker:
    config = SmtpConfig(host=smtp.host, port=smtp.port, retry_delay=0.05)
    return make_worker(queue, smtp=config, renderer=renderer, concurrency=8)


@pytest.fixture
async def client(
    queue: Queue, tasks: ReportTasks, worker: Worker
) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(create_app(queue, tasks, worker=worker)) as client:
        yield client


async def post_report(
    client: httpx.AsyncClient, recipients: list[str], title: str = "Q3 usage"
) -> dict[str, Any]:
    response = await client.post("/reports", json={"title": title, "recipients": recipients})
    assert response.status_code == 202, response.text
    body: dict[str, Any] = response.json()
    assert response.headers["location"] == body["status_url"]
    return body


async def report_status(client: httpx.AsyncClient, report_id: str) -> dict[str, Any]:
    response = await client.get(f"/reports/{report_id}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def summary_of(queue: Queue, tasks: ReportTasks, accepted: dict[str, Any]) -> DeliverySummary:
    """The fan-in callback's result (waits for it)."""
    job = queue.job(accepted["summary_job_id"], tasks.record_summary)
    return await job.result(timeout=WAIT)


async def events_until_summary(queue: Queue, report_id: str) -> list[JobEvent]:
    """The report's events, from the oldest kept, until its summary job has ended."""
    summary_id = ReportJobs(report_id).summary
    seen: list[JobEvent] = []

    async def read() -> None:
        async for event in queue.events(since="0-0/*"):
            if event.job_id.startswith(f"{report_id}."):
                seen.append(event)
                if event.job_id == summary_id and event.kind in _FINAL:
                    return

    await within(read())
    return seen


def kinds(events: list[JobEvent], job_id: str) -> list[str]:
    return [event.kind for event in events if event.job_id == job_id]


# -- the workflow ---------------------------------------------------------------------------


async def test_a_report_emails_every_recipient_once_and_the_callback_sums_up(
    client: httpx.AsyncClient,
    queue: Queue,
    tasks: ReportTasks,
    smtp: FakeSMTPServer,
    worker: Worker,
) -> None:
    recipients = [f"user{i}@example.com" for i in range(5)]
    accepted = await post_report(client, recipients, title="Q3 usage")
    report_id = accepted["report_id"]
    jobs = ReportJobs(report_id)
    assert accepted == {
        "report_id": report_id,
        "status_url": f"http://testserver/reports/{report_id}",
        "render_job_id": jobs.render,
        "group_id": jobs.emails,
        "summary_job_id": jobs.summary,
    }

    summary = await summary_of(queue, tasks, accepted)

    # Every recipient got exactly one email, with the report in it.
    assert Counter(message.to for message in smtp.messages) == Counter(recipients)
    for i, to in enumerate(recipients):
        (message,) = smtp.received_by(to)
        assert message.sender == "reports@reports.example"
        assert message.subject == "Your report: Q3 usage"
        assert message.message_id == f"<{jobs.email(i)}@reports.example>"
        assert f"https://reports.example/{report_id}.pdf" in message.body

    # The callback was fed every email's result, in recipient order.
    assert summary == DeliverySummary(
        report_id=report_id,
        total=5,
        sent=[
            Delivery(to=to, message_id=f"<{jobs.email(i)}@reports.example>", attempt=1)
            for i, to in enumerate(recipients)
        ],
        failed=[],
    )
    assert summary.text() == f"report {report_id}: 5 of 5 sent"

    # It ran exactly once, after the last email.
    events = await events_until_summary(queue, report_id)
    assert kinds(events, jobs.summary) == ["enqueued", "released", "started", "completed"]
    summary_info = await queue.job(jobs.summary).info()
    assert (summary_info.attempt, summary_info.deliveries) == (1, 1)
    last_email_ended = max(
        i
        for i, e in enumerate(events)
        if e.job_id.startswith(f"{report_id}.email-") and e.kind in _FINAL
    )
    released = next(
        i for i, e in enumerate(events) if e.job_id == jobs.summary and e.kind == "released"
    )
    assert released > last_email_ended
    assert worker.completed == len(recipients) + 2  # render, the emails, the summary

    # Progress was announced while the report rendered, before it completed.
    render_events = [e for e in events if e.job_id == jobs.render]
    assert [e.kind for e in render_events][-1] == "completed"
    progress = [e for e in render_events if e.kind == "progress"]
    assert [e.message for e in progress] == [
        "rendering 4 sections",
        *(f"rendered section {n} of 4" for n in range(1, 5)),
    ]
    assert [e.fraction for e in progress if e.fraction is not None and 0 < e.fraction < 1] == [
        0.25,
        0.5,
        0.75,
    ]
    last = await queue.job(jobs.render).progress()
    assert last is not None
    assert (last.fraction, last.message) == (1.0, "rendered section 4 of 4")

    # The status endpoint shows it all done.
    status = await report_status(client, report_id)
    assert status["stage"] == "done"
    assert status["render"]["status"] == "complete"
    assert status["render"]["progress"]["fraction"] == 1.0
    assert status["emails"] == {
        "group_id": jobs.emails,
        "status": "complete",
        "total": 5,
        "ended": 5,
        "counts": {"complete": 5},
    }
    assert status["summary"]["status"] == "complete"
    assert status["summary"]["error"] is None
    assert status["summary"]["result"]["sent"][0] == {
        "to": "user0@example.com",
        "message_id": f"<{jobs.email(0)}@reports.example>",
        "attempt": 1,
    }


async def test_progress_and_group_status_are_visible_while_the_report_renders(
    client: httpx.AsyncClient,
    queue: Queue,
    tasks: ReportTasks,
    renderer: HeldRenderer,
    smtp: FakeSMTPServer,
) -> None:
    renderer.hold_at = 2  # after two of four sections
    recipients = ["ann@example.com", "ben@example.com", "cy@example.com"]
    accepted = await post_report(client, recipients)
    report_id = accepted["report_id"]
    render = queue.job(accepted["render_job_id"], tasks.render_report)

    # Follow the render job's events live, while it runs.
    halfway = asyncio.Event()
    live: list[JobEvent] = []

    async def follow() -> None:
        async for event in render.events():
            live.append(event)
            if event.kind == "progress" and event.fraction == 0.5:
                halfway.set()

    follower = asyncio.create_task(follow())
    try:
        await within(renderer.held.wait())
        await within(halfway.wait())

        status = await report_status(client, report_id)
        assert status["stage"] == "rendering"
        assert status["render"]["status"] == "running"
        progress = status["render"]["progress"]
        assert (progress["fraction"], progress["message"]) == (0.5, "rendered section 2 of 4")
        assert status["emails"] == {
            "group_id": accepted["group_id"],
            "status": "waiting",
            "total": 3,
            "ended": 0,
            "counts": {"waiting": 3},
        }
        assert status["summary"] == {
            "job_id": accepted["summary_job_id"],
            "status": "waiting",
            "result": None,
            "error": None,
        }
        in_progress = await render.progress()
        assert isinstance(in_progress, JobProgress)
        assert in_progress.fraction == 0.5
        assert smtp.messages == []
    finally:
        renderer.release.set()  # also when an assertion failed: the worker can stop
    await within(follower)  # job.events() ends with the job's final event
    assert [e.kind for e in live][-1] == "completed"
    summary = await summary_of(queue, tasks, accepted)
    assert [delivery.to for delivery in summary.sent] == recipients
    assert (await report_status(client, report_id))["stage"] == "done"


async def test_a_refused_recipient_fails_its_email_and_the_summary_names_it(
    client: httpx.AsyncClient, queue: Queue, tasks: ReportTasks, smtp: FakeSMTPServer
) -> None:
    """``bounce@`` is refused for good (550): its email job fails at once, and with
    ``on_failure="pass"`` the callback still runs, with a MemberFailure in its place.
    ``greylist@`` is refused once (451): its job is retried and counted once, as sent."""
    recipients = [
        "alice@example.com",
        "bounce@example.com",
        "greylist@example.com",
        "bob@example.com",
    ]
    accepted = await post_report(client, recipients)
    report_id = accepted["report_id"]
    jobs = ReportJobs(report_id)

    summary = await summary_of(queue, tasks, accepted)

    error = "SMTP 550 5.1.1 mailbox unavailable (bounce@example.com)"
    assert summary.sent == [
        Delivery(
            to="alice@example.com", message_id=f"<{jobs.email(0)}@reports.example>", attempt=1
        ),
        Delivery(
            to="greylist@example.com", message_id=f"<{jobs.email(2)}@reports.example>", attempt=2
        ),
        Delivery(to="bob@example.com", message_id=f"<{jobs.email(3)}@reports.example>", attempt=1),
    ]
    assert summary.failed == [
        FailedDelivery(to="bounce@example.com", job_id=jobs.email(1), status="failed", error=error)
    ]
    assert summary.text() == f"report {report_id}: 3 of 4 sent, 1 failed (bounce@example.com)"

    # The SMTP server: one email each for the others, none for bounce@ (asked once: Fail
    # does not retry), greylist@ asked twice and sent once.
    assert Counter(message.to for message in smtp.messages) == Counter(
        ["alice@example.com", "greylist@example.com", "bob@example.com"]
    )
    assert smtp.rcpt_attempts["bounce@example.com"] == 1
    assert smtp.rcpt_attempts["greylist@example.com"] == 2

    # The email job failed at once; the group completed anyway (on_failure="pass").
    bounced = await queue.job(jobs.email(1)).info()
    assert bounced.status is JobStatus.FAILED
    assert bounced.attempt == 1
    assert bounced.error is not None
    assert bounced.error.message == error
    assert await queue.dead_letters() == []
    group = await queue.get_group(jobs.emails)
    results = await group.results(timeout=WAIT)
    assert isinstance(results[1], MemberFailure)
    assert (results[1].status, results[1].job_id, results[1].message) == (
        "failed",
        jobs.email(1),
        error,
    )

    # The callback ran once; the greylisted email's retry was not a second ending.
    events = await events_until_summary(queue, report_id)
    assert kinds(events, jobs.summary) == ["enqueued", "released", "started", "completed"]
    assert kinds(events, jobs.email(2)) == [
        "enqueued",
        "released",
        "started",
        "retrying",
        "started",
        "completed",
    ]
    assert kinds(events, jobs.email(1))[-1] == "failed"

    status = await report_status(client, report_id)
    assert status["stage"] == "done"
    assert status["emails"]["status"] == "complete"
    assert status["emails"]["counts"] == {"complete": 3, "failed": 1}
    assert status["summary"]["result"]["failed"] == [
        {"to": "bounce@example.com", "job_id": jobs.email(1), "status": "failed", "error": error}
    ]


# -- the request side -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"title": "x", "recipients": []}, 422),
        ({"title": "x", "recipients": ["not-an-address"]}, 422),
        ({"title": "x", "recipients": ["a@example.com, b@example.com"]}, 422),
        ({"title": "x", "recipients": ["a@example.com\r\nBcc: b@example.com"]}, 422),
        ({"title": "x", "recipients": ["a@example.com", "a@example.com"]}, 422),
        ({"title": "", "recipients": ["a@example.com"]}, 422),
        ({"title": "x\nBcc: b@example.com", "recipients": ["a@example.com"]}, 422),
        ({"title": "x", "recipients": ["a@example.com"], "cc": ["b@example.com"]}, 422),
        ({"recipients": ["a@example.com"]}, 422),
        ("not json", 400),
    ],
)
async def test_invalid_requests_enqueue_nothing(
    queue: Queue, tasks: ReportTasks, body: Any, status: int
) -> None:
    async with serving(create_app(queue, tasks)) as client:  # no worker
        if isinstance(body, str):
            response = await client.post("/reports", content=body)
        else:
            response = await client.post("/reports", json=body)
        assert response.status_code == status, response.text
        assert response.json()["error"].startswith("invalid")
    assert (await queue.counts()).ready == 0


async def test_a_full_queue_is_503_and_writes_none_of_the_workflow(
    redis_server: RedisServer, queue_name: str
) -> None:
    queue = Queue(redis_server.url, name=queue_name, max_size=1)
    tasks = register(queue)
    try:
        async with serving(create_app(queue, tasks)) as client:
            await tasks.render_report.enqueue("r-000000000000", "fills the queue")
            recipients = ["a@example.com", "b@example.com"]
            response = await client.post("/reports", json={"title": "x", "recipients": recipients})
            assert response.status_code == 503, response.text
            assert response.headers["retry-after"] == "30"
            assert response.json()["error"] == "queue full"
        assert (await queue.counts()).ready == 1  # the workflow's render job was not written
    finally:
        await queue.purge()
        await queue.close()


async def test_unknown_reports_are_404(queue: Queue, tasks: ReportTasks) -> None:
    async with serving(create_app(queue, tasks)) as client:
        for report_id in ["r-000000000000", "nope"]:
            response = await client.get(f"/reports/{report_id}")
            assert response.status_code == 404, response.text
            assert response.json()["error"] == "not found"


def test_the_embedded_worker_must_consume_the_apps_queue(queue: Queue, tasks: ReportTasks) -> None:
    other = Queue(queue.settings.redis_url, name=f"{queue.name}-other")
    with pytest.raises(ValueError, match="another queue"):
        create_app(queue, tasks, worker=make_worker(other))


# -- as the README runs it ------------------------------------------------------------------


@pytest.mark.slow
async def test_the_demo_runs_from_the_repository_root(
    redis_server: RedisServer, queue_name: str, queue: Queue
) -> None:
    """``python -m examples.report_emails``: its own SMTP server and embedded worker, six
    recipients (one bounced, one greylisted), progress printed, then the summary."""
    process = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "examples.report_emails"],
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
    out = process.stdout
    assert "rendered section 4 of 8" in out
    assert "retrying  greylist@example.com" in out
    assert "5 of 6 sent, 1 failed (bounce@example.com)" in out
    assert "the fake SMTP server accepted 5 messages" in out


@pytest.mark.slow
async def test_the_worker_runs_as_its_own_process(
    redis_server: RedisServer, queue: Queue, queue_name: str, smtp: FakeSMTPServer
) -> None:
    """``aioqueue run examples.report_emails.app:worker`` (in burst mode), with
    ``REPORTS_SMTP_HOST``/``REPORTS_SMTP_PORT`` naming the SMTP server, as in the README."""
    tasks = register(queue)
    async with serving(create_app(queue, tasks)) as client:
        accepted = await post_report(client, ["ann@example.com", "ben@example.com"])
        process = await asyncio.to_thread(
            subprocess.run,
            [
                sys.executable,
                "-m",
                "aioqueue",
                "run",
                "examples.report_emails.app:worker",
                "--burst",
            ],
            cwd=ROOT,
            env={
                "PATH": "/usr/bin:/bin",
                "AIOQUEUE_REDIS_URL": redis_server.url,
                "AIOQUEUE_QUEUE": queue_name,
                "REPORTS_SMTP_HOST": smtp.host,
                "REPORTS_SMTP_PORT": str(smtp.port),
            },
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert process.returncode == 0, process.stdout + process.stderr
        status = await report_status(client, accepted["report_id"])
    assert status["stage"] == "done"
    assert status["summary"]["result"]["total"] == 2
    assert sorted(message.to for message in smtp.messages) == ["ann@example.com", "ben@example.com"]
