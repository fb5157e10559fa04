"""The report workflow: render a report, email it to every recipient, record who got it.

One workflow per report, enqueued at once (all of it or nothing) by :meth:`ReportTasks.flow`::

    render_report ──> group(send_email for each recipient, on_failure="pass") ──> record_summary

* ``render_report(report_id, title)`` renders the report (fake work: a few sections of
  sleeping), reporting ``await ctx.progress(fraction, message)`` after each section;
* ``send_email(report, to)`` is fed the rendered :class:`Report` and sends one message through
  SMTP. A permanent refusal (``5xx``) fails the job at once (:class:`~aioqueue.Fail`); a
  temporary one (``4xx``, greylisting) retries it (:class:`~aioqueue.Retry`);
* ``record_summary(results, report_id, recipients)`` is the fan-in callback: it runs once,
  after every email job has ended, with their results in recipient order; a recipient whose
  email failed is a :class:`~aioqueue.MemberFailure` in that list (``on_failure="pass"``).

Every job of a report has a job id derived from the report id (:class:`ReportJobs`), so the
web app finds them again without storing anything.
"""

from __future__ import annotations

import asyncio
import os
import smtplib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any

from aioqueue import (
    Chain,
    Context,
    Fail,
    MemberFailure,
    Partial,
    Queue,
    Retry,
    Task,
    Worker,
    group,
)

__all__ = [
    "RENDERER",
    "SMTP",
    "Delivery",
    "DeliverySummary",
    "FailedDelivery",
    "Renderer",
    "Report",
    "ReportJobs",
    "ReportTasks",
    "SmtpConfig",
    "make_worker",
    "register",
]

# Keys of the shared objects in the worker's state (``ctx.state``), set by ``make_worker``.
SMTP = "report_emails_smtp"
RENDERER = "report_emails_renderer"

EMAIL_RETRIES = 3
"""Attempts after the first for one email (temporary SMTP refusals, connection errors)."""


# -- what the jobs return ---------------------------------------------------------------------
# Dataclasses rather than msgspec Structs: the callback's parameter is
# ``list[Delivery | MemberFailure]``, and msgspec can only decode a union of two classes when
# at most one of them is a Struct (MemberFailure is one).


@dataclass(frozen=True, kw_only=True)
class Report:
    """What ``render_report`` returns, and what every ``send_email`` of the report is fed."""

    report_id: str
    title: str
    sections: int
    size_bytes: int
    url: str
    """Where recipients download it (the email links to it instead of attaching it)."""


@dataclass(frozen=True, kw_only=True)
class Delivery:
    """What ``send_email`` returns: the SMTP server accepted the message."""

    to: str
    message_id: str
    attempt: int
    """The attempt that was accepted (above 1 after a temporary refusal)."""


@dataclass(frozen=True, kw_only=True)
class FailedDelivery:
    """A recipient whose email job did not complete, as the summary lists it."""

    to: str
    job_id: str
    status: str
    """How the email job ended: ``failed``, ``dead`` or ``aborted``."""
    error: str


@dataclass(frozen=True, kw_only=True)
class DeliverySummary:
    """What ``record_summary`` returns: who got the report and who did not, in recipient
    order."""

    report_id: str
    total: int
    sent: list[Delivery] = field(default_factory=list)
    failed: list[FailedDelivery] = field(default_factory=list)

    def text(self) -> str:
        """One line: ``report r-1f2e: 9 of 10 sent, 1 failed (bounce@example.com)``."""
        line = f"report {self.report_id}: {len(self.sent)} of {self.total} sent"
        if self.failed:
            names = ", ".join(failure.to for failure in self.failed)
            line += f", {len(self.failed)} failed ({names})"
        return line


# -- where emails go and how reports are made ---------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class SmtpConfig:
    """The SMTP server emails are sent through, and how they are addressed."""

    host: str = "localhost"
    port: int = 8025
    sender: str = "reports@reports.example"
    domain: str = "reports.example"
    """The right-hand side of Message-IDs, and the name this client gives in ``EHLO``."""
    timeout: float = 10.0
    retry_delay: float = 30.0
    """Seconds before an email refused with a temporary (4xx) error is tried again."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> SmtpConfig:
        """``REPORTS_SMTP_HOST`` (default ``localhost``) and ``REPORTS_SMTP_PORT`` (8025)."""
        env = os.environ if environ is None else environ
        return cls(
            host=env.get("REPORTS_SMTP_HOST") or "localhost",
            port=int(env.get("REPORTS_SMTP_PORT") or 8025),
        )

    def send(self, message: EmailMessage) -> None:
        """Send one message (blocking: run it with ``asyncio.to_thread``)."""
        with smtplib.SMTP(
            self.host, self.port, local_hostname=self.domain, timeout=self.timeout
        ) as client:
            client.send_message(message)


class Renderer:
    """Renders a report section by section. A stand-in for real work (queries, charts, a
    PDF): each section takes ``seconds_per_section``."""

    def __init__(self, sections: int = 8, seconds_per_section: float = 0.1) -> None:
        self.sections = sections
        self.seconds_per_section = seconds_per_section

    async def render_section(self, report_id: str, index: int) -> int:
        """Render section ``index`` (0-based); returns its size in bytes."""
        await asyncio.sleep(self.seconds_per_section)
        return 20_000 + 1_000 * index


# -- the jobs of one report -------------------------------------------------------------------


@dataclass(frozen=True)
class ReportJobs:
    """The ids of a report's jobs, all derived from the report id."""

    report_id: str

    @property
    def render(self) -> str:
        return f"{self.report_id}.render"

    @property
    def emails(self) -> str:
        """The group of email jobs (a group node: it never runs, it gathers results)."""
        return f"{self.report_id}.emails"

    def email(self, index: int) -> str:
        return f"{self.report_id}.email-{index}"

    @property
    def summary(self) -> str:
        return f"{self.report_id}.summary"


@dataclass(frozen=True)
class ReportTasks:
    """The three tasks of the workflow, registered on one queue by :func:`register`."""

    render_report: Task[[str, str], Report]
    send_email: Task[[Report, str], Delivery]
    record_summary: Task[[list[Delivery | MemberFailure], str, list[str]], DeliverySummary]

    def flow(self, report_id: str, title: str, recipients: Sequence[str]) -> Chain[DeliverySummary]:
        """The whole workflow of one report, for ``await tasks.flow(...).enqueue()``: render,
        then one email per recipient (each fed the rendered report), then the summary (fed
        every email's result, in recipient order). Enqueueing returns the summary's job."""
        jobs = ReportJobs(report_id)
        render = self.render_report.options(job_id=jobs.render).prepare(report_id, title)
        emails = group(
            (
                self.send_email.options(job_id=jobs.email(i)).partial(to)
                for i, to in enumerate(recipients)
            ),
            on_failure="pass",
            group_id=jobs.emails,
        )
        summary: Partial[list[Delivery | MemberFailure], DeliverySummary] = (
            self.record_summary.options(job_id=jobs.summary).partial(report_id, list(recipients))
        )
        return render.then(emails).then(summary)


def compose(report: Report, to: str, sender: str, message_id: str) -> EmailMessage:
    """The email announcing ``report`` to ``to``."""
    message = EmailMessage()
    message["From"] = sender
    message["To"] = to
    message["Subject"] = f"Your report: {report.title}"
    message["Message-ID"] = message_id
    message.set_content(
        f"Hello,\n\nyour report {report.title!r} is ready ({report.sections} sections, "
        f"{report.size_bytes // 1000} kB):\n{report.url}\n"
    )
    return message


def _refusal(code: int, text: bytes | str, to: str, retry_delay: float) -> Exception:
    """What to raise for an SMTP refusal: permanent (5xx) fails the job at once, temporary
    (4xx) retries it after ``retry_delay`` seconds."""
    reason = text.decode(errors="replace") if isinstance(text, bytes) else text
    message = f"SMTP {code} {reason} ({to})"
    if code >= 500:
        return Fail(message)
    return Retry(delay=retry_delay, reason=message)


def register(queue: Queue) -> ReportTasks:
    """Register the workflow's tasks on ``queue``.

    A function rather than module-level code so that each queue (a deployment's, a test's)
    gets its own registration.
    """

    @queue.task(timeout=300)
    async def render_report(ctx: Context, report_id: str, title: str) -> Report:
        """Render the report, reporting progress after each section."""
        renderer: Renderer = ctx.state[RENDERER]
        total = renderer.sections
        await ctx.progress(0.0, f"rendering {total} sections")
        size = 0
        for index in range(total):
            size += await renderer.render_section(report_id, index)
            await ctx.progress((index + 1) / total, f"rendered section {index + 1} of {total}")
        return Report(
            report_id=report_id,
            title=title,
            sections=total,
            size_bytes=size,
            url=f"https://reports.example/{report_id}.pdf",
        )

    @queue.task(retries=EMAIL_RETRIES, timeout=60)
    async def send_email(ctx: Context, report: Report, to: str) -> Delivery:
        """Email ``report`` to ``to``. The Message-ID is made from the job id, so a
        receiving system can drop the copy a redelivery after a worker crash would send."""
        smtp: SmtpConfig = ctx.state[SMTP]
        message_id = f"<{ctx.job_id}@{smtp.domain}>"
        message = compose(report, to, smtp.sender, message_id)
        try:
            await asyncio.to_thread(smtp.send, message)
        except smtplib.SMTPRecipientsRefused as exc:
            code, text = exc.recipients[to]
            raise _refusal(code, text, to, smtp.retry_delay) from None
        except smtplib.SMTPResponseException as exc:
            raise _refusal(exc.smtp_code, exc.smtp_error, to, smtp.retry_delay) from None
        return Delivery(to=to, message_id=message_id, attempt=ctx.attempt)

    @queue.task
    async def record_summary(
        ctx: Context,
        results: list[Delivery | MemberFailure],
        report_id: str,
        recipients: list[str],
    ) -> DeliverySummary:
        """The fan-in callback: ``results`` holds one entry per recipient, in order."""
        summary = DeliverySummary(report_id=report_id, total=len(recipients))
        for to, result in zip(recipients, results, strict=True):
            if isinstance(result, MemberFailure):
                failure = FailedDelivery(
                    to=to, job_id=result.job_id, status=result.status, error=result.message
                )
                summary.failed.append(failure)
            else:
                summary.sent.append(result)
        return summary

    return ReportTasks(render_report, send_email, record_summary)


def make_worker(
    queue: Queue,
    *,
    smtp: SmtpConfig | None = None,
    renderer: Renderer | None = None,
    **options: Any,
) -> Worker:
    """A worker for the report tasks on ``queue``: emails go through ``smtp`` (default
    :meth:`SmtpConfig.from_env`), reports are made by ``renderer``. ``options`` are
    ``queue.worker()`` keywords (``concurrency`` defaults to 10)."""
    smtp_config = smtp if smtp is not None else SmtpConfig.from_env()
    report_renderer = renderer if renderer is not None else Renderer()

    async def share(state: dict[str, Any]) -> None:
        state[SMTP] = smtp_config
        state[RENDERER] = report_renderer

    options.setdefault("concurrency", 10)
    return queue.worker(on_startup=[share], **options)
