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
