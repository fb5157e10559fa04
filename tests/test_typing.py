"""Enqueue is typed: mypy checks task arguments and result types at the call site."""

from __future__ import annotations

from pathlib import Path

import pytest
from mypy import api

pytestmark = pytest.mark.slow

PROGRAM = """
from aioqueue import Context, Queue

queue = Queue()


@queue.task(retries=3, timeout=10)
async def add(ctx: Context, a: int, b: int) -> int:
    return a + b


async def main() -> None:
    job = await add.enqueue(1, 2)
    total: int = await job.result(timeout=5)
    await add.options(job_id="x", delay=5).enqueue(1, 2)
    await add.enqueue("x", 2)
    await add.options(delay=5).enqueue(1, b="y")
    wrong: str = await (await add.enqueue(1, 2)).result()
"""


def test_mypy_rejects_wrong_arguments_and_result_types(tmp_path: Path) -> None:
    program = tmp_path / "program.py"
    program.write_text(PROGRAM)
    stdout, _, status = api.run(
        ["--strict", "--cache-dir", str(tmp_path / "cache"), "--no-error-summary", str(program)]
    )
    errors = [line.split(": error: ")[1] for line in stdout.splitlines() if ": error: " in line]
    assert status == 1
    assert errors == [
        'Argument 1 to "enqueue" of "Task" has incompatible type "str"; expected "int"  [arg-type]',
        'Argument "b" to "enqueue" of "TaskOptions" has incompatible type "str"; expected "int"  '
        "[arg-type]",
        'Incompatible types in assignment (expression has type "int", variable has type "str")  '
        "[assignment]",
    ]


WORKFLOWS = """
from aioqueue import Context, MemberFailure, Queue, chain, group

queue = Queue()


@queue.task
async def fetch(ctx: Context, url: str) -> bytes:
    return b""


@queue.task
async def parse(ctx: Context, body: bytes, encoding: str) -> list[str]:
    return []


@queue.task
async def count(ctx: Context, rows: list[list[str]]) -> int:
    return 0


@queue.task
async def tally(ctx: Context, rows: list[bytes | MemberFailure]) -> int:
    return 0


async def main() -> None:
    words: list[str] = await (await fetch.prepare("u").then(parse, "utf-8").enqueue()).result()
    members = [fetch.prepare("u").then(parse, "utf-8") for _ in range(3)]
    total: int = await (await group(members).then(count).enqueue()).result()
    results: list[bytes] = await (await group([fetch.prepare("u")]).enqueue()).results()
    passed = group([fetch.prepare("u")], on_failure="pass").then(tally)
    fetch.prepare("u").then(parse, 8)
    fetch.prepare("u").then(count)
    wrong: str = await (await group(members).then(count).enqueue()).result()
"""


def test_mypy_checks_workflow_steps(tmp_path: Path) -> None:
    program = tmp_path / "workflows.py"
    program.write_text(WORKFLOWS)
    stdout, _, status = api.run(
        ["--strict", "--cache-dir", str(tmp_path / "cache"), "--no-error-summary", str(program)]
    )
    errors = [line.split(": error: ")[1] for line in stdout.splitlines() if ": error: " in line]
    assert status == 1, stdout
    assert errors == [
        'No overload variant of "then" of "JobRequest" matches argument types '
        '"Task[[bytes, str], list[str]]", "int"  [call-overload]',
        'No overload variant of "then" of "JobRequest" matches argument type '
        '"Task[[list[list[str]]], int]"  [call-overload]',
        'Incompatible types in assignment (expression has type "int", variable has type "str")  '
        "[assignment]",
    ], stdout


SYNC_TASKS = """
from aioqueue import Context, Queue

queue = Queue()


@queue.task
def shout(ctx: Context, word: str) -> str:
    return word.upper()


@queue.task(retries=2, timeout=5)
def count(ctx: Context, n: int) -> int:
    return n


async def main(ctx: Context) -> None:
    reveal_type(shout)
    reveal_type(count)
    text: str = await (await shout.enqueue("a")).result()
    direct: int = await count(ctx, 1)
    await count.enqueue("x")
    wrong: int = await shout(ctx, "a")
"""


def test_mypy_types_plain_def_tasks_like_async_ones(tmp_path: Path) -> None:
    program = tmp_path / "sync_tasks.py"
    program.write_text(SYNC_TASKS)
    stdout, _, status = api.run(
        ["--strict", "--cache-dir", str(tmp_path / "cache"), "--no-error-summary", str(program)]
    )
    notes = [line.split(": note: ")[1] for line in stdout.splitlines() if ": note: " in line]
    errors = [line.split(": error: ")[1] for line in stdout.splitlines() if ": error: " in line]
    assert status == 1, stdout
    assert notes == [
        'Revealed type is "aioqueue.task.Task[[word: str], str]"',
        'Revealed type is "aioqueue.task.Task[[n: int], int]"',
    ], stdout
    assert errors == [
        'Argument 1 to "enqueue" of "Task" has incompatible type "str"; expected "int"  [arg-type]',
        'Incompatible types in assignment (expression has type "str", variable has type "int")  '
        "[assignment]",
    ], stdout
