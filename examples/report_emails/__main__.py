"""The whole example in one process: ``python -m examples.report_emails [ADDRESS ...]``.

Starts a fake SMTP server on a free local port and the web app with a worker embedded in its
lifespan, posts one report for the recipients (by default six, one of them refused for good
and one greylisted once), prints the workflow's events while it runs, and the summary the
fan-in callback recorded. Redis comes from ``AIOQUEUE_REDIS_URL`` (default
``redis://localhost:6379/0``); the queue is ``report-emails-demo`` (``AIOQUEUE_QUEUE``).
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import httpx

from aioqueue import JobEvent, Queue

from .app import create_app
from .smtp import FakeSMTPServer
from .tasks import DeliverySummary, Renderer, ReportJobs, SmtpConfig, make_worker, register

__all__ = ["DEFAULT_RECIPIENTS", "demo", "main"]

DEFAULT_RECIPIENTS = [
    "alice@example.com",
    "bob@example.com",
    "carol@example.com",
    "greylist@example.com",  # the fake server refuses it once with 451: retried, then sent
    "bounce@example.com",  # refused for good with 550: its email job fails
    "dave@example.com",
]
WAIT = 60.0
"""Longest the demo waits for the report's workflow to end, in seconds."""

_FINAL = frozenset({"completed", "failed", "dead", "aborted"})


async def demo(recipients: list[str], title: str = "Monthly usage") -> DeliverySummary:
    """Run one report through the web app and return its delivery summary."""
    async with FakeSMTPServer() as smtp:
        queue = Queue(name="report-emails-demo")
        tasks = register(queue)
        worker = make_worker(
            queue,
            smtp=SmtpConfig(host=smtp.host, port=smtp.port, retry_delay=0.5),
            renderer=Renderer(sections=8, seconds_per_section=0.1),
        )
        app = create_app(queue, tasks, worker=worker)
        print(f"fake SMTP server on {smtp.host}:{smtp.port}; {queue!r} on {_redis(queue)}")
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://demo"
            ) as http,
        ):
            response = await http.post("/reports", json={"title": title, "recipients": recipients})
            if response.status_code != 202:
                raise SystemExit(f"POST /reports: {response.status_code} {response.text}")
            accepted = response.json()
            report_id: str = accepted["report_id"]
            print(f"POST /reports ({len(recipients)} recipients) -> 202, report {report_id}")
            await asyncio.wait_for(_follow(queue, http, report_id, recipients), WAIT)
            summary_job = queue.job(accepted["summary_job_id"], tasks.record_summary)
            summary = await summary_job.result(timeout=WAIT)
    print(f"\nsummary (the fan-in callback's result): {summary.text()}")
    for delivery in summary.sent:
        print(f"  sent    {delivery.to:<24} {delivery.message_id} (attempt {delivery.attempt})")
    for failure in summary.failed:
        print(f"  {failure.status:<7} {failure.to:<24} {failure.error}")
    print(f"the fake SMTP server accepted {len(smtp.messages)} messages")
    return summary


async def _follow(
    queue: Queue, http: httpx.AsyncClient, report_id: str, recipients: list[str]
) -> None:
    """Print the report's events as they happen, until its summary job has ended. After
    each email that ended, print what ``GET /reports/{report_id}`` says (when it changed)."""
    jobs = ReportJobs(report_id)
    labels = {jobs.render: "render", jobs.summary: "summary"}
    labels.update({jobs.email(i): f"email {i}" for i in range(len(recipients))})
    shown = ""
    # The queue's events from the oldest kept: those of this report so far, then each as it
    # happens. (queue.events() alone starts with the next event.)
    async for event in queue.events(since="0-0/*"):
        label = labels.get(event.job_id)
        if label is None:
            continue
        print(f"  [{label:>7}] {event.kind:<9} {_details(event, recipients, jobs)}")
        if event.job_id == jobs.summary and event.kind in _FINAL:
            return
        if event.job_id != jobs.render and event.kind in _FINAL:
            status = (await http.get(f"/reports/{report_id}")).json()
            emails = status["emails"]
            line = (
                f"stage {status['stage']}, {emails['ended']} of {emails['total']} emails "
                f"ended {emails['counts']}"
            )
            if line != shown:
                print(f"            GET /reports/{report_id}: {line}")
                shown = line


def _details(event: JobEvent, recipients: list[str], jobs: ReportJobs) -> str:
    if event.kind == "progress":
        fraction = "" if event.fraction is None else f"{event.fraction:4.0%}"
        return f"{fraction:>4}  {event.message or ''}"
    to = next((to for i, to in enumerate(recipients) if jobs.email(i) == event.job_id), "")
    return " ".join(part for part in (to, event.reason or "") if part)


def _redis(queue: Queue) -> str:
    url = queue.settings.redis_url
    return url.split("@")[-1] if "@" in url else url  # no password in the output


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m examples.report_emails",
        description="Render one report, email it to every recipient, print the summary.",
    )
    parser.add_argument(
        "recipients",
        nargs="*",
        metavar="ADDRESS",
        help="recipients (default: six, including greylist@ and bounce@ addresses)",
    )
    parser.add_argument("--title", default="Monthly usage")
    args = parser.parse_args()
    summary = asyncio.run(demo(args.recipients or DEFAULT_RECIPIENTS, args.title))
    sys.exit(0 if summary.total else 1)


if __name__ == "__main__":
    main()
