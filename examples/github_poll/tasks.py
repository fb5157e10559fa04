"""Poll GitHub's most-starred repositories every 10 minutes and keep the answer in Redis.

The poll is polite to GitHub:

* it sends the last ``ETag`` in ``If-None-Match``; a ``304 Not Modified`` keeps the stored
  answer and only records when GitHub was last asked (``checked_at``);
* it obeys the rate limit: a response with ``X-RateLimit-Remaining: 0`` records
  ``X-RateLimit-Reset`` so no request is made before then, and a rate-limited response
  (403 or 429) reschedules the job for that moment with :class:`aioqueue.Retry`.

Settings come from the environment, read when a worker starts: ``GITHUB_API_URL`` (default
``https://api.github.com``), ``GITHUB_TOKEN`` (optional), and aioqueue's own
``AIOQUEUE_REDIS_URL`` and ``AIOQUEUE_QUEUE`` (default queue name ``github``).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal

import httpx
import msgspec
import redis.asyncio as aioredis

from aioqueue import Context, Fail, Queue, Retry, Task
from aioqueue.worker import Hook

__all__ = [
    "HTTP",
    "REDIS",
    "SCHEDULE",
    "GitHubConfig",
    "GitHubError",
    "PollSummary",
    "Repo",
    "TopRepos",
    "TopStore",
    "client_hooks",
    "close_clients",
    "open_clients",
    "poll",
    "poll_github",
    "queue",
    "register",
]

logger = logging.getLogger(__name__)

SCHEDULE = "*/10 * * * *"
"""Every 10 minutes, on the wall clock (UTC): 00:00, 00:10, 00:20, ..."""
RATE_LIMIT = "5000/h"
"""GitHub's REST API budget per token (docs/flow-control.md#rate-and-concurrency-limits)."""
RETRIES = 5
"""Attempts after the first; a rate-limited attempt waits for the reset and counts as one."""
SEARCH_PATH = "/search/repositories"
TOP = 100
"""How many repositories are kept: one page of the search, the most-starred first."""
SEARCH_PARAMS = {"q": "stars:>1", "sort": "stars", "per_page": str(TOP)}
DEFAULT_API_URL = "https://api.github.com"
FALLBACK_WAIT = 60.0
"""Seconds to wait when GitHub says the limit is exhausted but not until when."""

# Keys of the shared clients in the worker's state (``ctx.state``), set by ``open_clients``.
HTTP = "github_http"
REDIS = "github_redis"


@dataclass(frozen=True)
class GitHubConfig:
    """Where GitHub is and how to authenticate; :meth:`from_env` reads the environment."""

    api_url: str = DEFAULT_API_URL
    token: str | None = None
    timeout: float = 10.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> GitHubConfig:
        """``GITHUB_API_URL`` (e.g. ``https://ghe.example.com/api/v3``) and ``GITHUB_TOKEN``."""
        env = os.environ if environ is None else environ
        return cls(
            api_url=env.get("GITHUB_API_URL") or DEFAULT_API_URL,
            token=env.get("GITHUB_TOKEN") or None,
        )

    def client(self) -> httpx.AsyncClient:
        """An HTTP client for the API: one per worker, shared by all its jobs."""
        headers = {
            "Accept": "application/vnd.github+json",
            "X-GitHub-Api-Version": "2022-11-28",
            "User-Agent": "aioqueue-github-poll-example",
        }
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return httpx.AsyncClient(base_url=self.api_url, headers=headers, timeout=self.timeout)


class GitHubError(Exception):
    """GitHub answered with something unexpected; the job is retried with backoff."""


# -- what is stored and returned ----------------------------------------------------------


class Repo(msgspec.Struct, frozen=True):
    """One repository, as stored and served."""

    name: str
    full_name: str
    stars: int
    url: str
    description: str | None


class TopRepos(msgspec.Struct, frozen=True, kw_only=True):
    """The stored answer: GitHub's top repositories by stars, and when we asked."""

    repos: list[Repo]
    etag: str | None
    fetched_at: datetime
    """When GitHub last sent the list (a 200)."""
    checked_at: datetime
    """When GitHub last confirmed it (a 200 or a 304)."""


class PollSummary(msgspec.Struct, frozen=True, kw_only=True):
    """What one poll did; the job's result."""

    outcome: Literal["fetched", "not_modified"]
    count: int
    top: list[str]
    """Full names of the five most-starred repositories."""
    etag: str | None
    fetched_at: datetime
    checked_at: datetime
    rate_limit_remaining: int | None


class _SearchItem(msgspec.Struct):
    """The fields of a search result item we keep; msgspec skips the other ones."""

    name: str
    full_name: str
    stargazers_count: int
    html_url: str
    description: str | None = None


class _SearchPage(msgspec.Struct):
    items: list[_SearchItem]


_page_decoder = msgspec.json.Decoder(_SearchPage)
_repos_decoder = msgspec.json.Decoder(list[Repo])


# -- storage ------------------------------------------------------------------------------


def storage_key(queue_name: str) -> str:
    """The Redis hash holding the answer; one per queue, so deployments (and tests) that use
    different queues never share it."""
    return f"github_poll:{queue_name}:top"


class TopStore:
    """The stored answer in one Redis hash (fields ``repos`` as JSON, ``etag``, ``fetched_at``
    and ``checked_at``), and the end of a rate-limit pause in a key that expires with it."""

    def __init__(self, redis: aioredis.Redis, queue_name: str) -> None:
        self.redis = redis
        self.key = storage_key(queue_name)
        self.pause_key = f"github_poll:{queue_name}:rate_limited_until"

    async def load(self) -> TopRepos | None:
        """The stored answer, or None before the first successful poll."""
        fields = {_text(k): _text(v) for k, v in (await self.redis.hgetall(self.key)).items()}
        if "repos" not in fields:
            return None
        return TopRepos(
            repos=_repos_decoder.decode(fields["repos"]),
            etag=fields.get("etag"),
            fetched_at=datetime.fromisoformat(fields["fetched_at"]),
            checked_at=datetime.fromisoformat(fields["checked_at"]),
        )

    async def save(self, repos: list[Repo], etag: str | None, at: datetime) -> None:
        """Replace the stored answer with a freshly fetched one (atomically)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self.key)
            pipe.hset(
                self.key,
                mapping={
                    "repos": msgspec.json.encode(repos),
                    "fetched_at": at.isoformat(),
                    "checked_at": at.isoformat(),
                },
            )
            if etag:
                pipe.hset(self.key, "etag", etag)
            await pipe.execute()

    async def mark_checked(self, at: datetime) -> None:
        """GitHub confirmed the stored answer (304): record when, change nothing else."""
        await self.redis.hset(self.key, "checked_at", at.isoformat())

    async def paused_until(self) -> float | None:
        """The Unix time GitHub's rate limit resets, while it is exhausted; else None."""
        value = await self.redis.get(self.pause_key)
        return None if value is None else float(value)

    async def pause_until(self, reset: float) -> None:
        """Make no request before ``reset`` (Unix seconds); the key expires by itself."""
        if reset > time.time():
            await self.redis.set(self.pause_key, str(reset), exat=math.ceil(reset))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


# -- the poll -----------------------------------------------------------------------------


async def poll(http: httpx.AsyncClient, store: TopStore) -> PollSummary:
    """Ask GitHub for the top repositories unless the rate limit forbids it; store the answer.

    Raises :class:`~aioqueue.Retry` (with the delay until the rate limit resets) when rate
    limited, :class:`~aioqueue.Fail` when GitHub refuses the request for good (a bad token),
    and :class:`GitHubError` (retried with backoff) for server errors.
    """
    paused = await store.paused_until()
    wait = 0.0 if paused is None else paused - time.time()
    if paused is not None and wait > 0:
        raise Retry(delay=wait, reason=f"rate limited until {_iso(paused)}")
    stored = await store.load()
    headers = {"If-None-Match": stored.etag} if stored is not None and stored.etag else {}
    response = await http.get(SEARCH_PATH, params=SEARCH_PARAMS, headers=headers)
    checked_at = datetime.now(timezone.utc)
    remaining = _int_header(response, "X-RateLimit-Remaining")
    reset = _int_header(response, "X-RateLimit-Reset")
    if remaining == 0 and reset is not None:
        await store.pause_until(reset)  # the next poll waits for the reset, even after a 200
    status = response.status_code

    if status in (403, 429):
        raise _refusal(response, remaining, reset)
    if status == 304 and stored is not None:
        await store.mark_checked(checked_at)
        logger.info("GitHub: top repositories unchanged since %s", stored.fetched_at)
        return _summary(
            "not_modified", stored.repos, stored.etag, stored.fetched_at, checked_at, remaining
        )
    if status != 200:
        if 400 <= status < 500:
            raise Fail(f"GitHub refused the search: HTTP {status}: {_message(response)}")
        raise GitHubError(f"GitHub search failed: HTTP {status}: {_message(response)}")

    page = _page_decoder.decode(response.content)
    repos = [
        Repo(item.name, item.full_name, item.stargazers_count, item.html_url, item.description)
        for item in page.items[:TOP]
    ]
    etag = response.headers.get("ETag")
    await store.save(repos, etag, checked_at)
    logger.info("GitHub: stored the top %d repositories (ETag %s)", len(repos), etag)
    return _summary("fetched", repos, etag, checked_at, checked_at, remaining)


def _refusal(response: httpx.Response, remaining: int | None, reset: int | None) -> Exception:
    """What to raise for a 403 or 429: a Retry timed by the rate limit headers when there
    are any, else a Fail (403: forbidden) or a Retry with the task's backoff (429)."""
    status = response.status_code
    if remaining == 0:
        now = time.time()
        delay = max(reset - now, 1.0) if reset is not None else FALLBACK_WAIT
        until = _iso(now + delay)
        return Retry(delay=delay, reason=f"HTTP {status}: rate limited until {until}")
    retry_after = _int_header(response, "Retry-After")  # secondary rate limits
    if retry_after is not None:
        return Retry(delay=max(retry_after, 1), reason=f"HTTP {status}: retry after {retry_after}s")
    if status == 429:
        return Retry(reason="HTTP 429: too many requests")
    return Fail(f"GitHub refused the search: HTTP {status}: {_message(response)}")


def _summary(
    outcome: Literal["fetched", "not_modified"],
    repos: list[Repo],
    etag: str | None,
    fetched_at: datetime,
    checked_at: datetime,
    remaining: int | None,
) -> PollSummary:
    return PollSummary(
        outcome=outcome,
        count=len(repos),
        top=[repo.full_name for repo in repos[:5]],
        etag=etag,
        fetched_at=fetched_at,
        checked_at=checked_at,
        rate_limit_remaining=remaining,
    )


def _int_header(response: httpx.Response, name: str) -> int | None:
    value = response.headers.get(name)
    try:
        return None if value is None else int(value)
    except ValueError:
        return None


def _message(response: httpx.Response) -> str:
    """GitHub's error message (``{"message": ...}``), or the start of the body."""
    try:
        body = msgspec.json.decode(response.content)
    except msgspec.DecodeError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return str(body["message"])
    return response.text[:200]


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).isoformat(timespec="seconds")


# -- wiring it to a queue -----------------------------------------------------------------


def register(queue: Queue) -> Task[[], PollSummary]:
    """Register the poll on ``queue``: every worker of the queue runs it every 10 minutes
    (exactly once per tick however many workers run), and ``poll_github.enqueue()`` runs it
    now.

    A function rather than module-level code so that each queue (a deployment's, a test's)
    gets its own registration.
    """

    # GitHub's REST budget is 5,000 requests an hour per token: enforced in Redis across every
    # worker, so polls enqueued by hand (the web endpoint) never spend it faster, and one
    # over the limit waits for its turn instead of failing.
    @queue.cron(SCHEDULE, retries=RETRIES, timeout=60, rate_limit=RATE_LIMIT, rate_burst=10)
    async def poll_github(ctx: Context) -> PollSummary:
        """Fetch GitHub's most-starred repositories (or confirm them) and store them."""
        return await poll(ctx.state[HTTP], TopStore(ctx.state[REDIS], ctx.queue.name))

    return poll_github


def client_hooks(queue: Queue) -> tuple[Hook, Hook]:
    """``on_startup`` and ``on_shutdown`` hooks that open and close the clients every poll of
    ``queue`` shares: an ``httpx.AsyncClient`` for GitHub and a Redis client for the answer."""

    async def open_clients(state: dict[str, Any]) -> None:
        state[HTTP] = GitHubConfig.from_env().client()
        state[REDIS] = aioredis.Redis.from_url(queue.settings.redis_url, decode_responses=True)

    async def close_clients(state: dict[str, Any]) -> None:
        http = state.pop(HTTP, None)
        if http is not None:
            await http.aclose()
        redis = state.pop(REDIS, None)
        if redis is not None:
            await redis.aclose()

    return open_clients, close_clients


queue = Queue(name="github")  # AIOQUEUE_REDIS_URL and AIOQUEUE_QUEUE override these
poll_github = register(queue)
open_clients, close_clients = client_hooks(queue)
