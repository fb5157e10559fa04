"""A fake SMTP server (aiosmtpd) that keeps what it receives, for the demo and the tests.

It runs in the current event loop, on a free local port unless given one::

    async with FakeSMTPServer() as smtp:       # smtp.port is the port it listens on
        ...
    smtp.messages                              # every message accepted, one per recipient

Two kinds of recipient are refused, so failures can be tried without configuration:

* ``bounce...@...`` (a local part starting with ``bounce``): ``550 5.1.1`` every time, a
  permanent error: the email job fails at once;
* ``greylist...@...``: ``451 4.7.1`` the first time it is named, accepted after, as
  greylisting does: the email job is retried once.

From the repository root, ``python -m examples.report_emails.smtp --port 8025`` runs it on its
own and prints what it receives (for the app and a worker run as separate processes).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from email import message_from_bytes, policy
from types import TracebackType

from aiosmtpd.smtp import SMTP, Envelope, Session

__all__ = ["FakeSMTPServer", "Received"]


@dataclass(frozen=True, kw_only=True)
class Received:
    """One message the server accepted, for one recipient."""

    sender: str
    to: str
    subject: str
    message_id: str
    body: str


class FakeSMTPServer:
    """An SMTP server in this event loop that records messages (see the module's doc)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        on_message: Callable[[Received], None] | None = None,
    ) -> None:
        self.host = host
        self.port = port
        """The port it listens on (a free one, chosen at start, when given 0)."""
        self.on_message = on_message
        self.messages: list[Received] = []
        self.rcpt_attempts: Counter[str] = Counter()
        """How often each recipient was named in ``RCPT TO`` (refused ones included)."""
        self._server: asyncio.Server | None = None

    def received_by(self, to: str) -> list[Received]:
        return [message for message in self.messages if message.to == to]

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        # hostname given: aiosmtpd would otherwise look up this machine's name in DNS.
        self._server = await loop.create_server(
            lambda: SMTP(self, hostname="fake-smtp.local"), self.host, self.port
        )
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> FakeSMTPServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- aiosmtpd's handler hooks ---------------------------------------------------------------

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        self.rcpt_attempts[address] += 1
        local = address.partition("@")[0].lower()
        if local.startswith("bounce"):
            return "550 5.1.1 mailbox unavailable"
        if local.startswith("greylist") and self.rcpt_attempts[address] == 1:
            return "451 4.7.1 greylisted, try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        parsed = message_from_bytes(envelope.original_content or b"", policy=policy.default)
        body = parsed.get_body(("plain",))
        for to in envelope.rcpt_tos:
            received = Received(
                sender=envelope.mail_from or "",
                to=to,
                subject=str(parsed["Subject"] or ""),
                message_id=str(parsed["Message-ID"] or ""),
                body=body.get_content() if body is not None else "",
            )
            self.messages.append(received)
            if self.on_message is not None:
                self.on_message(received)
        return "250 2.0.0 message accepted"


def _print(message: Received) -> None:
    print(f"{message.message_id} to {message.to}: {message.subject}", flush=True)


async def _serve(host: str, port: int) -> None:
    async with FakeSMTPServer(host, port, on_message=_print) as server:
        print(f"fake SMTP server on {server.host}:{server.port}; Ctrl-C stops it", flush=True)
        await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description="A fake SMTP server that prints what it gets.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8025)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.host, args.port))


if __name__ == "__main__":
    main()
