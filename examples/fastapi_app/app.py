"""A FastAPI app that builds reports in the background with aioqueue.

* ``POST /reports``: validate the body, enqueue ``build_report``, answer 202 with the job id
  and a ``Location`` header (``/jobs/{job_id}``);
* ``GET /jobs/{job_id}``: the job's status (and its result or error once final), at once;
* ``GET /jobs/{job_id}/result?timeout=5``: wait up to ``timeout`` seconds for the result;
* ``POST /jobs/{job_id}/abort``: abort a queued, delayed or running job.

The lifespan opens the queue's connections at startup and closes them at shutdown. With
``REPORTS_EMBEDDED_WORKER=1`` it also runs the worker inside the app's event loop.

From the repository root::

    uvicorn examples.fastapi_app.app:app                 # the web app
    aioqueue run examples.fastapi_app.app:worker         # and the worker, in another process

    REPORTS_EMBEDDED_WORKER=1 uvicorn examples.fastapi_app.app:app   # or both in one
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import datetime
from typing import Annotated, Any

from fastapi import (
    APIRouter,
    Depends,
    FastAPI,
    Header,
    HTTPException,
    Path,
    Query,
    Request,
    Response,
)
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from aioqueue import (
    JobAborted,
    JobFailed,
    JobInfo,
    JobNotFound,
    JobStatus,
    Queue,
    QueueFull,
    ResultTimeout,
    Task,
    Worker,
)
from examples.fastapi_app.tasks import ReportKind, ReportSummary, make_worker, register

__all__ = ["EMBEDDED_WORKER_ENV", "MAX_WAIT", "app", "create_app", "embedded_from_env", "worker"]

EMBEDDED_WORKER_ENV = "REPORTS_EMBEDDED_WORKER"
"""Set to ``1`` (or ``true``, ``yes``, ``on``) to run the worker inside the web app."""

MAX_WAIT = 30.0
"""The longest ``GET /jobs/{job_id}/result`` holds a request open, in seconds."""

QUEUE_FULL_RETRY_AFTER = 30
"""Seconds a client is asked to wait (``Retry-After``) when the queue is full."""

BuildReport = Task[[int, ReportKind], ReportSummary]


# -- request and response bodies -----------------------------------------------------------


class ReportRequest(BaseModel):
    """The body of ``POST /reports``."""

    model_config = ConfigDict(extra="forbid")

    user_id: int = Field(gt=0, examples=[42])
    kind: ReportKind


class Accepted(BaseModel):
    """A job was enqueued (or an earlier one with the same ``Idempotency-Key`` exists)."""

    job_id: str
    status_url: str
    result_url: str


class JobErrorView(BaseModel):
    """Why a job failed: the remote exception's type and message (never its traceback)."""

    type: str
    message: str


class JobView(BaseModel):
    """A job's status; ``result`` once it completed, ``error`` once it failed."""

    job_id: str
    status: JobStatus
    task: str | None
    attempt: int
    enqueued_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    run_at: datetime | None = Field(description="when a scheduled or retrying job runs next")
    reason: str = Field(description="why the job was retried, failed or dead-lettered")
    result: ReportSummary | None = None
    error: JobErrorView | None = None

    @classmethod
    def from_info(cls, info: JobInfo) -> JobView:
        final = info.status.is_final
        return cls(
            job_id=info.id,
            status=info.status,
            task=info.task,
            attempt=info.attempt,
            enqueued_at=info.enqueued_at,
            started_at=info.started_at,
            finished_at=info.finished_at,
            run_at=info.run_at,
            reason=info.reason,
            result=info.result if info.status is JobStatus.COMPLETE else None,
            error=(
                JobErrorView(type=info.error.type, message=info.error.message)
                if final and info.error is not None
                else None
            ),
        )


class Pending(BaseModel):
    """``GET /jobs/{job_id}/result`` gave up waiting; ask again later."""

    job_id: str
    status: JobStatus
    detail: str


class Failure(BaseModel):
    """A job that will never have a result, or cannot be aborted."""

    error: str
    detail: str
    job_id: str | None = None
    status: JobStatus | None = None
    error_type: str | None = None


class Aborted(BaseModel):
    """The job is aborted now; a running one is being cancelled by its worker."""

    job_id: str
    previous_status: JobStatus
    status: JobStatus


# -- dependencies --------------------------------------------------------------------------


def _queue(request: Request) -> Queue:
    queue: Queue = request.app.state.queue
    return queue


def _build_report(request: Request) -> BuildReport:
    task: BuildReport = request.app.state.build_report
    return task


QueueDep = Annotated[Queue, Depends(_queue)]
BuildReportDep = Annotated[BuildReport, Depends(_build_report)]
JobId = Annotated[str, Path(min_length=1, max_length=128)]

NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "no such job (or expired)"}}


def _not_found(job_id: str) -> HTTPException:
    return HTTPException(404, detail=f"job {job_id!r} does not exist (never enqueued, or expired)")


def _json(
    model: BaseModel, status_code: int, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(model.model_dump(mode="json"), status_code=status_code, headers=headers)


# -- routes --------------------------------------------------------------------------------

router = APIRouter()


@router.post(
    "/reports",
    status_code=202,
    responses={503: {"description": "the queue is full; retry after `Retry-After` seconds"}},
)
async def create_report(
    body: ReportRequest,
    request: Request,
    response: Response,
    build_report: BuildReportDep,
    idempotency_key: Annotated[
        str | None,
        Header(
            min_length=1,
            max_length=64,
            pattern=r"^[A-Za-z0-9_.:-]+$",
            description="the same key returns the same job (while its record is kept)",
        ),
    ] = None,
) -> Accepted:
    """Enqueue a report; poll ``status_url`` or wait on ``result_url`` for it."""
    enqueuer = (
        build_report.options(job_id=f"report-{idempotency_key}")
        if idempotency_key
        else build_report
    )
    try:
        job = await enqueuer.enqueue(body.user_id, body.kind)
    except QueueFull:
        raise HTTPException(
            503,
            detail="too many reports are waiting; retry later",
            headers={"Retry-After": str(QUEUE_FULL_RETRY_AFTER)},
        ) from None
    status_url = str(request.url_for("job_status", job_id=job.id))
    response.headers["Location"] = status_url
    return Accepted(
        job_id=job.id,
        status_url=status_url,
        result_url=str(request.url_for("job_result", job_id=job.id)),
    )


@router.get("/jobs/{job_id}", name="job_status", responses=NOT_FOUND)
async def job_status(job_id: JobId, queue: QueueDep, build_report: BuildReportDep) -> JobView:
    """The job's status now, without waiting."""
    try:
        info = await queue.job(job_id, build_report).info()
    except JobNotFound:
        raise _not_found(job_id) from None
    return JobView.from_info(info)


@router.get(
    "/jobs/{job_id}/result",
    name="job_result",
    response_model=ReportSummary,
    responses={
        **NOT_FOUND,
        202: {"model": Pending, "description": "not finished within `timeout`; ask again"},
        409: {"model": Failure, "description": "the job was aborted"},
        500: {"model": Failure, "description": "the job failed or was dead-lettered"},
    },
)
async def job_result(
    job_id: JobId,
    request: Request,
    queue: QueueDep,
    build_report: BuildReportDep,
    timeout: Annotated[float, Query(ge=0, le=MAX_WAIT, description="seconds to wait")] = 5.0,
) -> Any:
    """The report, once the job completes: waits up to ``timeout`` seconds for it."""
    job = queue.job(job_id, build_report)
    try:
        return await job.result(timeout=timeout)
    except ResultTimeout:
        pending = Pending(
            job_id=job_id,
            status=await job.status(),
            detail=f"not finished within {timeout:g}s",
        )
        return _json(pending, 202, {"Retry-After": "1", "Location": str(request.url)})
    except JobNotFound:
        raise _not_found(job_id) from None
    except JobAborted:
        failure = Failure(
            error="job aborted",
            detail="the job was aborted before it completed",
            job_id=job_id,
            status=JobStatus.ABORTED,
        )
        return _json(failure, 409)
    except JobFailed as exc:
        failure = Failure(
            error="job failed",
            detail=exc.remote_message,
            job_id=job_id,
            status=JobStatus(exc.status),
            error_type=exc.error_type,
        )
        return _json(failure, 500)


@router.post(
    "/jobs/{job_id}/abort",
    response_model=Aborted,
    responses={**NOT_FOUND, 409: {"model": Failure, "description": "the job already ended"}},
)
async def abort_job(job_id: JobId, queue: QueueDep) -> Aborted | JSONResponse:
    """Abort the job: a waiting one never runs, a running one is cancelled."""
    previous = await queue.job(job_id).abort()
    if previous is JobStatus.NOT_FOUND:
        raise _not_found(job_id)
    if previous.is_final:
        failure = Failure(
            error="job already ended",
            detail=f"the job is {previous.value}; there is nothing to abort",
            job_id=job_id,
            status=previous,
        )
        return _json(failure, 409)
    return Aborted(job_id=job_id, previous_status=previous, status=JobStatus.ABORTED)


# -- the app -------------------------------------------------------------------------------


def create_app(
    queue: Queue, *, embedded_worker: bool = False, worker: Worker | None = None
) -> FastAPI:
    """The app for ``queue``; registers ``build_report`` on it (once per queue).

    ``worker`` (default: ``make_worker(queue)``) is the worker for this queue, available as
    ``app.state.worker``. With ``embedded_worker`` the lifespan runs it inside the app's event
    loop, started before the first request and drained at shutdown; otherwise it runs
    elsewhere (``aioqueue run examples.fastapi_app.app:worker``).
    """
    build_report = register(queue)
    if worker is None:
        worker = make_worker(queue)
    elif worker.queue is not queue:
        raise ValueError(f"{worker!r} consumes another queue than {queue!r}")
    embedded = worker if embedded_worker else None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(queue)  # connect now: fail fast if Redis is down
            if embedded is not None:
                # Exits first: the worker drains its in-flight jobs while the queue is open.
                await stack.enter_async_context(embedded.embedded())
            yield

    app = FastAPI(
        title="Reports",
        summary="Reports built in the background by aioqueue workers.",
        lifespan=lifespan,
    )
    app.state.queue = queue
    app.state.build_report = build_report
    app.state.worker = worker
    app.include_router(router)
    return app


def embedded_from_env(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether ``REPORTS_EMBEDDED_WORKER`` asks for the embedded worker (unset: no)."""
    value = environ.get(EMBEDDED_WORKER_ENV, "").strip().lower()
    if value in {"", "0", "false", "no", "off"}:
        return False
    if value in {"1", "true", "yes", "on"}:
        return True
    raise ValueError(f"{EMBEDDED_WORKER_ENV}={value!r}: expected 1/0, true/false, yes/no, on/off")


queue = Queue(name="reports")  # AIOQUEUE_REDIS_URL and AIOQUEUE_QUEUE override these
app = create_app(queue, embedded_worker=embedded_from_env())
worker: Worker = app.state.worker
"""What ``aioqueue run examples.fastapi_app.app:worker`` starts."""
