"""A Starlette app that starts report workflows and shows how far they are.

* ``POST /reports`` ``{"title": "...", "recipients": ["a@example.com", ...]}``: enqueue the
  report's whole workflow (render, one email per recipient, the summary) and answer 202;
* ``GET /reports/{report_id}``: at once, without waiting: the render job's status and
  progress, the email group's status and counts, and the summary once there is one.

From the repository root::

    uvicorn examples.report_emails.app:app                  # the web app
    aioqueue run examples.report_emails.app:worker          # and a worker, in another process

``python -m examples.report_emails`` runs everything in one process instead (see README.md).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Annotated, Any

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from aioqueue import GroupStatus, JobInfo, JobNotFound, JobStatus, Queue, QueueFull, Worker

from .tasks import ReportJobs, ReportTasks, make_worker, register

__all__ = ["MAX_RECIPIENTS", "ReportRequest", "app", "create_app", "queue", "tasks", "worker"]

MAX_RECIPIENTS = 100
"""Most recipients one report is sent to."""

QUEUE_FULL_RETRY_AFTER = 30
"""Seconds a client is asked to wait (``Retry-After``) when the queue is full."""

# An address without spaces, control characters, commas or angle brackets: nothing that could
# add a header or a second recipient to the message.
Address = Annotated[
    str,
    msgspec.Meta(max_length=254, pattern=r"^[^@\s<>,;\x00-\x1f\x7f]+@[^@\s<>,;\x00-\x1f\x7f]+$"),
]
Title = Annotated[str, msgspec.Meta(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")]


class ReportRequest(msgspec.Struct, forbid_unknown_fields=True):
    """The body of ``POST /reports``."""

    title: Title
    recipients: Annotated[list[Address], msgspec.Meta(min_length=1, max_length=MAX_RECIPIENTS)]


_request_decoder = msgspec.json.Decoder(ReportRequest)
_REPORT_ID = re.compile(r"^r-[0-9a-f]{12}$")


def create_app(queue: Queue, tasks: ReportTasks, *, worker: Worker | None = None) -> Starlette:
    """The app for the report workflow of ``tasks`` on ``queue``. With ``worker``, the app's
    lifespan runs that worker inside the app (``worker.embedded()``); without, workers run
    elsewhere (``aioqueue run examples.report_emails.app:worker``)."""
    if worker is not None and worker.queue is not queue:
        raise ValueError("the embedded worker consumes another queue than the app's")
    endpoints = _Endpoints(queue, tasks)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(queue)  # connect now: fail fast if Redis is down
            if worker is not None:
                await stack.enter_async_context(worker.embedded())
            yield

    return Starlette(
        routes=[
            Route("/reports", endpoints.create, methods=["POST"]),
            Route("/reports/{report_id}", endpoints.show, methods=["GET"]),
        ],
        lifespan=lifespan,
    )


class _Endpoints:
    def __init__(self, queue: Queue, tasks: ReportTasks) -> None:
        self.queue = queue
        self.tasks = tasks

    async def create(self, request: Request) -> Response:
        """Enqueue one report's workflow: all its jobs at once, or none (queue full)."""
        try:
            body = _request_decoder.decode(await request.body())
        except msgspec.ValidationError as exc:
            return _json({"error": "invalid request", "detail": str(exc)}, status=422)
        except msgspec.DecodeError as exc:
            return _json({"error": "invalid JSON", "detail": str(exc)}, status=400)
        repeated = sorted({to for to in body.recipients if body.recipients.count(to) > 1})
        if repeated:
            detail = f"each recipient gets one email; repeated: {', '.join(repeated)}"
            return _json({"error": "invalid request", "detail": detail}, status=422)

        report_id = f"r-{uuid.uuid4().hex[:12]}"
        jobs = ReportJobs(report_id)
        try:
            await self.tasks.flow(report_id, body.title, body.recipients).enqueue()
        except QueueFull:
            return _json(
                {"error": "queue full", "detail": "too many jobs are waiting; retry later"},
                status=503,
                headers={"Retry-After": str(QUEUE_FULL_RETRY_AFTER)},
            )
        status_url = str(request.url_for("show", report_id=report_id))
        return _json(
            {
                "report_id": report_id,
                "status_url": status_url,
                "render_job_id": jobs.render,
                "group_id": jobs.emails,
                "summary_job_id": jobs.summary,
            },
            status=202,
            headers={"Location": status_url},
        )

    async def show(self, request: Request) -> Response:
        """Where a report is, read at once from its jobs' records."""
        report_id = request.path_params["report_id"]
        if not _REPORT_ID.match(report_id):
            return _not_found(report_id)
        jobs = ReportJobs(report_id)
        try:
            render = await self.queue.job(jobs.render, self.tasks.render_report).info()
            emails = await (await self.queue.get_group(jobs.emails)).status()
            summary = await self.queue.job(jobs.summary, self.tasks.record_summary).info()
        except JobNotFound:
            return _not_found(report_id)
        return _json(
            {
                "report_id": report_id,
                "stage": _stage(render, emails, summary),
                "render": {
                    "job_id": render.id,
                    "status": render.status,
                    "progress": render.progress,  # also: await job.progress()
                },
                "emails": {
                    "group_id": jobs.emails,
                    "status": emails.status,
                    "total": emails.total,
                    "ended": emails.done,
                    "counts": {status.value: n for status, n in emails.counts.items()},
                },
                "summary": {
                    "job_id": summary.id,
                    "status": summary.status,
                    "result": summary.result if summary.status is JobStatus.COMPLETE else None,
                    "error": _error(summary),
                },
            }
        )


def _stage(render: JobInfo, emails: GroupStatus, summary: JobInfo) -> str:
    """``rendering``, ``sending``, ``summarising``, then ``done`` (or ``failed``)."""
    if summary.status is JobStatus.COMPLETE:
        return "done"
    if summary.status.is_final:
        return "failed"
    if not render.status.is_final:
        return "rendering"
    if emails.status is JobStatus.WAITING:
        return "sending"
    return "summarising"


def _error(info: JobInfo) -> dict[str, str] | None:
    """A failed job's error type and message (never its traceback)."""
    if not info.status.is_final or info.error is None:
        return None
    return {"type": info.error.type, "message": info.error.message, "reason": info.reason}


def _not_found(report_id: str) -> Response:
    detail = f"no report {report_id!r} (never made, or expired)"
    return _json({"error": "not found", "detail": detail}, status=404)


def _json(body: Any, *, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    """A JSON response encoded by msgspec (dataclasses, Structs, datetimes and enums)."""
    return Response(
        msgspec.json.encode(body),
        status_code=status,
        headers=headers,
        media_type="application/json",
    )


queue = Queue(name="report-emails")  # AIOQUEUE_REDIS_URL and AIOQUEUE_QUEUE override these
tasks = register(queue)
worker = make_worker(queue)  # REPORTS_SMTP_HOST and REPORTS_SMTP_PORT say where emails go
app = create_app(queue, tasks)
