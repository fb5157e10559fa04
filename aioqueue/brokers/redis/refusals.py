"""Refused credentials, ACL rights and certificates, turned into aioqueue errors whose
message names the exact right or setting to fix.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Sequence

import redis.exceptions as rexc

from aioqueue.brokers.redis.keys import Keys
from aioqueue.errors import (
    AccessDenied,
    AuthenticationFailed,
    PermissionDenied,
    TLSError,
)

DOCS = "see 'Securing Redis' in aioqueue's deploying guide for the rights of each role"

_REFUSED_COMMAND = re.compile(r"permissions to run the '([^']+)' command")
_QUEUE_IN_TEXT = re.compile(r"aioqueue:\{([^}\s]*)\}")
# The error texts of a refusal inside a script: Redis 7.0 says ERR, not NOPERM.
_SCRIPT_REFUSALS = ("can't run this command", "can't access at least one of the", "ACL failure")

# TLS alerts and errors that say a certificate or the protocol is wrong, not that the
# connection dropped (those, such as an EOF during the handshake, are outages).
_TLS_REASONS = {
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": (
        "the server requires a client certificate: give ssl_certfile= and ssl_keyfile= in "
        "the Redis URL"
    ),
    "SSLV3_ALERT_BAD_CERTIFICATE": (
        "the server refused this client's certificate: use one signed by a CA the server "
        "trusts (its tls-ca-cert-file)"
    ),
    "TLSV1_ALERT_UNKNOWN_CA": (
        "the server does not trust the CA that signed this client's certificate: use one "
        "signed by a CA the server trusts (its tls-ca-cert-file)"
    ),
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "the server refused this client's certificate",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the server says this client's certificate expired",
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "the server says this client's certificate is revoked",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "the server does not accept this client's certificate",
    "TLSV1_ALERT_ACCESS_DENIED": "the server refused this client's certificate",
    "WRONG_VERSION_NUMBER": (
        "the server does not speak TLS on this port: use redis:// or the server's tls-port"
    ),
    "TLSV1_ALERT_PROTOCOL_VERSION": "the server and this client share no TLS version",
    "UNSUPPORTED_PROTOCOL": "the server and this client share no TLS version",
    "NO_PROTOCOLS_AVAILABLE": "the server and this client share no TLS version",
}


def refusal(
    exc: BaseException, what: str, keys: Keys | None = None, user: str | None = None
) -> AccessDenied | None:
    """The aioqueue error for a refusal by Redis (credentials, ACL rights) or a certificate
    TLS would not accept, or None when ``exc`` is none of those."""
    if isinstance(exc, rexc.AuthenticationError):
        if "NOAUTH" in str(exc) or "Authentication required" in str(exc):
            return AuthenticationFailed(
                f"Redis wants a password ({exc}) while {what}: put the user and password in "
                "the Redis URL (user:password@ before the host, special characters "
                "percent-encoded)"
            )
        return AuthenticationFailed(
            f"Redis refused the credentials while {what} ({exc}): check the user name and "
            "password in the Redis URL (user:password@ before the host, special characters "
            "percent-encoded)"
        )
    if isinstance(exc, rexc.AuthorizationError):
        return AccessDenied(f"Redis refused this client while {what}: {exc}")
    if isinstance(exc, rexc.ResponseError):
        if is_refusal(exc):
            return permission_denied([str(exc)], f" while {what}", keys, user)
        return None
    if isinstance(exc, rexc.ConnectionError):
        problem = tls_problem(exc)
        if problem is not None:
            return TLSError(f"TLS with Redis failed while {what}: {problem}")
    return None


def is_refusal(exc: rexc.ResponseError) -> bool:
    """True for an ACL refusal (redis-py drops the ``NOPERM`` of its text)."""
    if isinstance(exc, rexc.NoPermissionError):
        return True
    message = str(exc)
    return "NOPERM" in message or any(text in message for text in _SCRIPT_REFUSALS)


def permission_denied(
    refusals: Sequence[str],
    context: str,
    keys: Keys | None = None,
    user: str | None = None,
    *,
    commands: Sequence[str] = (),
) -> PermissionDenied:
    """One error for every right Redis refused (``refusals`` are its error texts, and
    ``commands`` the probed commands they answer, if known), naming the ACL rules that
    grant them. ``context`` ends the sentence: " while counting jobs", ", which a worker
    needs"."""
    missing: list[str] = []
    script = False
    for i, message in enumerate(refusals):
        queue = keys.queue if keys else None
        if queue is None:
            found = _QUEUE_IN_TEXT.search(message)
            queue = found[1] if found else "<queue>"
        named = _REFUSED_COMMAND.search(message)
        if named:
            rule = f"+{named[1]}"
        elif "channel" in message:
            rule = f"&aioqueue:{{{queue}}}:*"
        elif "key" in message:
            rule = f"~aioqueue:{{{queue}}}:*"
        elif i < len(commands):
            rule = f"+{commands[i]}"
        else:
            script = True
            continue
        if rule not in missing:
            missing.append(rule)
    who = f"the Redis user {user!r}" if user else "the Redis user"
    if not missing:
        return PermissionDenied(
            f"{who} may not run a command a script runs{context}: grant the rights of its "
            f"role ({DOCS})"
        )
    refused = _describe_rules(missing)
    also = " (and a command a script runs)" if script else ""
    grant = f"ACL SETUSER {user or '<user>'} {' '.join(missing)}"
    them = "it" if len(missing) == 1 else "them"
    return PermissionDenied(
        f"{who} may not {refused}{also}{context}: grant {them} with {grant} ({DOCS})",
        missing,
    )


def _describe_rules(rules: Sequence[str]) -> str:
    """``["+xadd", "+zadd", "~aioqueue:{q}:*"]`` as "run XADD and ZADD or use the keys of
    queue 'q'"."""
    commands = [rule[1:].upper().replace("|", " ") for rule in rules if rule.startswith("+")]
    parts = [f"run {_and(commands)}"] if commands else []
    for rule in rules:
        if rule[0] in "~&":
            queue = rule[len("~aioqueue:{") : -len("}:*")]
            kind = "keys" if rule[0] == "~" else "channels"
            parts.append(f"use the {kind} of queue {queue!r}")
    return " or ".join(parts)


def _and(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def tls_problem(exc: BaseException) -> str | None:
    """What is wrong with the certificates, if a TLS error in ``exc``'s chain says so."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, ssl.SSLCertVerificationError):
            detail = cause.verify_message or str(cause)
            if "hostname" in detail.lower() or "ip address mismatch" in detail.lower():
                return (
                    f"the server's certificate does not name this host ({detail}): connect "
                    "with a host name the certificate names"
                )
            return (
                f"the server's certificate is not trusted ({detail}): give the CA that signed "
                "it with ssl_ca_certs=/path/to/ca.pem in the Redis URL"
            )
        if isinstance(cause, ssl.SSLError) and cause.reason in _TLS_REASONS:
            return f"{_TLS_REASONS[str(cause.reason)]} ({cause.reason})"
        cause = cause.__cause__ or cause.__context__
    return None


def was_reset(exc: BaseException) -> bool:
    cause: BaseException | None = exc
    for _ in range(5):
        if cause is None:
            return False
        if isinstance(cause, ConnectionResetError) or "reset by peer" in str(cause):
            return True
        cause = cause.__cause__ or cause.__context__
    return False
