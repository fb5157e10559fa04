"""The GitHub poll example (examples/github_poll) against a local fake GitHub and real Redis.

The fake is a real HTTP/1.1 server on a free loopback port (asyncio streams, no extra
process): the example's httpx client talks to it over TCP exactly as it would to GitHub.
"""

from __future__ import annotations

import asyncio
import http
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import msgspec
import pytest
import redis.asyncio as aioredis
from conftest import RedisServer
from helpers import ROOT, eventually, run_cli, running

from aioqueue import Job, JobFailed, JobStatus, Queue, Task, Worker
from examples.github_poll.app import create_app
from examples.github_poll.tasks import (
    SCHEDULE,
    PollSummary,
    TopRepos,
    TopStore,
    client_hooks,
    register,
    storage_key,
)

RESULT_TIMEOUT = 10.0


@dataclass
class Seen:
    """One request the fake received."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]


@dataclass
class FakeGitHub:
    """Answers ``GET /search/repositories`` like GitHub: 200 with an ETag, 304 when
    ``If-None-Match`` matches it, and a 403/429 while ``refuse_with`` is set. Every response
    carries ``X-RateLimit-Remaining`` (``remaining``) and ``X-RateLimit-Reset`` (``reset``)."""

    etag: str = 'W/"top-v1"'
    remaining: int = 29
    reset: int = field(default_factory=lambda: int(time.time()) + 60)
    refuse_with: int | None = None
    retry_after: int | None = None
    requests: list[Seen] = field(default_factory=list)
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()

    def respond(self, request: Seen) -> tuple[int, dict[str, str], bytes]:
        headers = {
            "X-RateLimit-Limit": "30",
            "X-RateLimit-Remaining": str(self.remaining),
            "X-RateLimit-Reset": str(self.reset),
        }
        if request.path != "/search/repositories":
            return 404, headers, b'{"message": "Not Found"}'
        if self.refuse_with is not None:
            if self.retry_after is not None:
                headers["Retry-After"] = str(self.retry_after)
            body = b'{"message": "API rate limit exceeded for 127.0.0.1."}'
            return self.refuse_with, headers, body
        headers["ETag"] = self.etag
        if request.headers.get("if-none-match") == self.etag:
            return 304, headers, b""
        return 200, headers, msgspec.json.encode(search_page())

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while request := await _read_request(reader):
                self.requests.append(request)
                status, headers, body = self.respond(request)
                head = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}"]
                head += [f"{name}: {value}" for name, value in headers.items()]
                if status != 304:
                    head += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
                writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()


async def _read_request(reader: asyncio.StreamReader) -> Seen | None:
    """Read one HTTP/1.1 request (head and body); None once the client has closed."""
    line = await reader.readline()
    if not line.strip():
        return None
    method, target, _ = line.decode("latin-1").split(" ", 2)
    headers: dict[str, str] = {}
    while (line := await reader.readline()).strip():
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    await reader.readexactly(int(headers.get("content-length", "0")))
    parts = urlsplit(target)
    return Seen(method, parts.path, dict(parse_qsl(parts.query)), headers)


def search_page(count: int = 100) -> dict[str, Any]:
    """A search result page in GitHub's shape, with fields the example ignores."""
    items = [
        {
            "id": 1000 + i,
            "name": f"repo{i}",
            "full_name": f"owner{i}/repo{i}",
            "owner": {"login": f"owner{i}", "id": i},
            "stargazers_count": 500_000 - i * 1000,
            "html_url": f"https://github.com/owner{i}/repo{i}",
            "description": None if i % 10 == 0 else f"Repository number {i}",
            "topics": ["example"],
            "score": 1.0,
        }
        for i in range(count)
    ]
    return {"total_count": 9_000_000, "incomplete_results": False, "items": items}


@pytest.fixture
async def github(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeGitHub]:
    fake = FakeGitHub()
    await fake.start()
    monkeypatch.setenv("GITHUB_API_URL", fake.url)
    monkeypatch.delenv("GITHUB_TOKEN", raising=False)
    yield fake
    await fake.stop()


@pytest.fixture
def poll_github(queue: Queue) -> Task[[], PollSummary]:
    return register(queue)


@pytest.fixture
def worker(queue: Queue, poll_github: Task[[], PollSummary]) -> Worker:
    open_clients, close_clients = client_hooks(queue)
    return queue.worker(concurrency=4, on_startup=[open_clients], on_shutdown=[close_clients])


@pytest.fixture
async def store(redis_server: RedisServer, queue_name: str) -> AsyncIterator[TopStore]:
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    yield TopStore(client, queue_name)
    await client.aclose()


async def _stored(store: TopStore) -> TopRepos:
    stored = await store.load()
    assert stored is not None
    return stored


async def _retrying(job: Job[Any]) -> bool:
    return await job.status() is JobStatus.RETRYING


# -- the poll -----------------------------------------------------------------------------


async def test_200_stores_the_top_100_and_the_etag(
    github: FakeGitHub,
    poll_github: Task[[], PollSummary],
    worker: Worker,
    store: TopStore,
    queue_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GITHUB_TOKEN", "ghp_secret")
    async with running(worker):
        summary = await (await poll_github.enqueue()).result(timeout=RESULT_TIMEOUT)

    (request,) = github.requests
    assert request.method == "GET"
    assert request.path == "/search/repositories"
    assert request.query == {"q": "stars:>1", "sort": "stars", "per_page": "100"}
    assert request.headers["authorization"] == "Bearer ghp_secret"
    assert request.headers["accept"] == "application/vnd.github+json"
    assert request.headers["user-agent"]
    assert "if-none-match" not in request.headers

    assert summary.outcome == "fetched"
    assert summary.count == 100
    assert summary.top == [f"owner{i}/repo{i}" for i in range(5)]
    assert summary.etag == github.etag
    assert summary.rate_limit_remaining == 29

    assert store.key == storage_key(queue_name)
    assert queue_name in store.key
    stored = await _stored(store)
    assert len(stored.repos) == 100
    first, second = stored.repos[:2]
    assert (first.name, first.full_name, first.stars) == ("repo0", "owner0/repo0", 500_000)
    assert first.url == "https://github.com/owner0/repo0"
    assert first.description is None
    assert second.description == "Repository number 1"
    assert [repo.stars for repo in stored.repos] == sorted(
        (repo.stars for repo in stored.repos), reverse=True
    )
    assert stored.etag == github.etag
    assert stored.fetched_at == stored.checked_at == summary.fetched_at
    assert await store.paused_until() is None


async def test_304_sends_the_stored_etag_and_keeps_the_answer(
    github: FakeGitHub, poll_github: Task[[], PollSummary], worker: Worker, store: TopStore
) -> None:
    async with running(worker):
        first = await (await poll_github.enqueue()).result(timeout=RESULT_TIMEOUT)
        before = await _stored(store)
        second = await (await poll_github.enqueue()).result(timeout=RESULT_TIMEOUT)

    assert [request.headers.get("if-none-match") for request in github.requests] == [
        None,
        github.etag,
    ]
    assert first.outcome == "fetched"
    assert second.outcome == "not_modified"
    assert second.count == 100
    assert second.etag == github.etag
    after = await _stored(store)
    assert after.repos == before.repos
    assert after.etag == before.etag
    assert after.fetched_at == before.fetched_at == second.fetched_at
    assert after.checked_at == second.checked_at > before.checked_at


@pytest.mark.parametrize("status", [403, 429])
async def test_rate_limited_response_retries_at_the_reset_time(
    status: int,
    github: FakeGitHub,
    poll_github: Task[[], PollSummary],
    worker: Worker,
    store: TopStore,
) -> None:
    github.refuse_with = status
    github.remaining = 0
    github.reset = int(time.time()) + 120
    async with running(worker):
        job = await poll_github.enqueue()
        await eventually(lambda: _retrying(job))

    info = await job.info()
    assert info.status is JobStatus.RETRYING
    assert info.run_at is not None
    assert abs(info.run_at.timestamp() - github.reset) < 1.5
    assert "rate limited" in info.reason
    assert info.attempt == 2
    assert len(github.requests) == 1
    assert await store.paused_until() == github.reset
    assert await store.load() is None


async def test_exhausted_limit_after_a_200_defers_the_next_poll_without_a_request(
    github: FakeGitHub, poll_github: Task[[], PollSummary], worker: Worker, store: TopStore
) -> None:
    github.remaining = 0
    github.reset = int(time.time()) + 300
    async with running(worker):
        summary = await (await poll_github.enqueue()).result(timeout=RESULT_TIMEOUT)
        job = await poll_github.enqueue()
        await eventually(lambda: _retrying(job))

    assert summary.outcome == "fetched"
    assert summary.rate_limit_remaining == 0
    assert len(github.requests) == 1
    info = await job.info()
    assert info.run_at is not None
    assert abs(info.run_at.timestamp() - github.reset) < 1.5
    assert len((await _stored(store)).repos) == 100


async def test_secondary_rate_limit_waits_for_retry_after(
    github: FakeGitHub, poll_github: Task[[], PollSummary], worker: Worker
) -> None:
    github.refuse_with = 403
    github.retry_after = 90
    async with running(worker):
        started = time.time()
        job = await poll_github.enqueue()
        await eventually(lambda: _retrying(job))
        retried = time.time()
    info = await job.info()
    assert info.run_at is not None
    assert started + 90 - 0.01 <= info.run_at.timestamp() <= retried + 90 + 0.01
    assert "retry after 90s" in info.reason


async def test_forbidden_without_rate_limit_headers_fails_for_good(
    github: FakeGitHub, poll_github: Task[[], PollSummary], worker: Worker
) -> None:
    github.refuse_with = 403
    async with running(worker):
        job = await poll_github.enqueue()
        with pytest.raises(JobFailed, match="HTTP 403"):
            await job.result(timeout=RESULT_TIMEOUT)
    assert await job.status() is JobStatus.FAILED


async def test_polls_every_ten_minutes_and_runs_from_the_repository_root(
    redis_server: RedisServer, queue_name: str
) -> None:
    from examples.github_poll import worker as module

    for worker in (module.worker, module.WorkerSettings):
        jobs = worker.queue.cron_jobs if isinstance(worker, type) else worker.cron_jobs
        assert [(job.name, job.schedule, job.retries) for job in jobs] == [
            ("poll_github", SCHEDULE, 5)
        ]
    assert SCHEDULE == "*/10 * * * *"
    result = await asyncio.to_thread(
        run_cli,
        "cron",
        "list",
        "examples.github_poll.worker:worker",
        url=redis_server.url,
        queue=queue_name,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert "poll_github" in result.stdout
    assert "*/10 * * * *" in result.stdout


# -- the ASGI app -------------------------------------------------------------------------


@pytest.fixture
async def client(
    queue: Queue, poll_github: Task[[], PollSummary]
) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(queue, poll_github, refresh_timeout=RESULT_TIMEOUT)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://testserver"
        ) as client,
    ):
        yield client


async def test_top_is_503_until_an_answer_is_stored(client: httpx.AsyncClient) -> None:
    response = await client.get("/top")
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["error"] == "no data yet"
    assert "POST /refresh" in body["detail"]


async def test_refresh_polls_now_and_top_serves_the_answer(
    github: FakeGitHub, worker: Worker, client: httpx.AsyncClient
) -> None:
    async with running(worker):
        refreshed = await client.post("/refresh")
        assert refreshed.status_code == 200, refreshed.text
        summary = refreshed.json()
        assert summary["outcome"] == "fetched"
        assert summary["count"] == 100
        assert summary["top"][0] == "owner0/repo0"

        top = await client.get("/top")
        assert top.status_code == 200
        body = top.json()
        assert len(body["repos"]) == 100
        assert body["repos"][0] == {
            "name": "repo0",
            "full_name": "owner0/repo0",
            "stars": 500_000,
            "url": "https://github.com/owner0/repo0",
            "description": None,
        }
        assert body["etag"] == github.etag
        assert body["fetched_at"] == body["checked_at"] == summary["fetched_at"]

        again = await client.post("/refresh")
        assert again.status_code == 200
        assert again.json()["outcome"] == "not_modified"
    assert len(github.requests) == 2


async def test_refresh_is_429_while_the_rate_limit_is_exhausted(
    github: FakeGitHub, worker: Worker, client: httpx.AsyncClient
) -> None:
    github.remaining = 0
    github.reset = int(time.time()) + 300
    async with running(worker):
        assert (await client.post("/refresh")).status_code == 200
        response = await client.post("/refresh")
    assert response.status_code == 429
    assert response.json()["error"] == "rate limited"
    assert 290 <= int(response.headers["retry-after"]) <= 300
    assert len(github.requests) == 1


async def test_refresh_without_a_worker_answers_202_with_the_job(
    queue: Queue, poll_github: Task[[], PollSummary]
) -> None:
    app = create_app(queue, poll_github, refresh_timeout=0.3)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client,
    ):
        response = await client.post("/refresh")
    assert response.status_code == 202
    assert response.json()["status"] == "queued"
