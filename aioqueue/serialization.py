"""msgspec codecs for everything that crosses the wire, and typed argument decoding.

Jobs are msgpack. The envelope is an array-like Struct (compact, no field names on the wire);
arguments and results are encoded once and decoded against the task's own type annotations,
so a worker never calls a task with a value of the wrong type. Nothing here uses pickle.
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import typing
from collections.abc import Callable
from typing import Annotated, Any

import msgspec

from aioqueue.errors import ConfigurationError, InvalidArguments, SerializationError

MAX_RETRIES = 10_000
"""Most retries a job may ask for."""
MAX_TIMEOUT = 31_536_000.0
"""Longest per-job timeout in seconds (a year)."""
TASK_NAME = r"^[^\x00-\x1f\x7f]{1,200}$"
"""A task name: 1 to 200 characters, none of them a control character (a newline in a name
read from Redis would forge log lines)."""

MAX_MS = 253_402_300_799_999
"""The last millisecond of year 9999: timestamps past it do not fit a datetime."""

TaskName = Annotated[str, msgspec.Meta(pattern=TASK_NAME)]
Millis = Annotated[int, msgspec.Meta(ge=0, le=MAX_MS)]
Retries = Annotated[int, msgspec.Meta(ge=0, le=MAX_RETRIES)]
Timeout = Annotated[float, msgspec.Meta(gt=0, le=MAX_TIMEOUT)]


class Envelope(msgspec.Struct, array_like=True, frozen=True, omit_defaults=True):
    """What a producer writes for one job. Field names never reach the wire (array-like).

    Anyone who can write to Redis can write an envelope, so decoding checks the bounds of
    every field the worker acts on (a NaN timeout or 10^18 retries is undecodable)."""

    task: TaskName
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = {}
    enqueued_ms: Millis = 0
    # Per-job overrides of the task's options; None means "use the task's".
    retries: Retries | None = None
    timeout: Timeout | None = None
    # Opaque tracing context (W3C traceparent and friends) propagated to the worker.
    trace: dict[str, str] | None = None
    # For cron runs: the scheduled fire time of the tick, in Unix ms.
    fire_ms: Millis | None = None
    # A workflow step whose first argument is its dependency's result: signed with the
    # rest, so nobody who can write Redis can hand an input to a job that takes none.
    fed: bool = False


class ErrorInfo(msgspec.Struct, array_like=True, frozen=True):
    """A task's failure as recorded in Redis."""

    type: str
    message: str
    traceback: str = ""


class MemberFailure(msgspec.Struct, array_like=True, frozen=True):
    """A group member that did not complete, standing in for its result where the group's
    results are passed on with ``on_failure="pass"``."""

    status: str
    """How the member ended: ``failed``, ``dead``, ``aborted`` (or ``missing``)."""
    job_id: str
    type: str
    """The member's error type, e.g. ``ValueError``."""
    message: str
    traceback: str = ""


MEMBER_ERROR_EXT = 42
"""The msgpack extension code a group's result uses for a member that did not complete."""


def _ext_hook(code: int, data: memoryview) -> Any:
    if code == MEMBER_ERROR_EXT:
        return msgspec.msgpack.decode(data, type=MemberFailure)
    return msgspec.msgpack.Ext(code, bytes(data))


_encoder = msgspec.msgpack.Encoder()
_envelope_decoder = msgspec.msgpack.Decoder(Envelope)
_error_decoder = msgspec.msgpack.Decoder(ErrorInfo)
_any_decoder = msgspec.msgpack.Decoder(ext_hook=_ext_hook)


def encode(value: Any) -> bytes:
    """Encode any msgspec-supported value as msgpack, or raise :class:`SerializationError`."""
    try:
        return _encoder.encode(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise SerializationError(f"cannot encode {type(value).__name__}: {exc}") from exc


def decode(data: bytes, type_: Any = Any) -> Any:
    """Decode msgpack, checking the result against ``type_``."""
    try:
        if type_ is Any:
            return _any_decoder.decode(data)
        return msgspec.msgpack.decode(data, type=type_, ext_hook=_ext_hook)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise SerializationError(f"cannot decode {type_!r}: {exc}") from exc


def decode_result(data: bytes, type_: Any = Any) -> Any:
    """Decode a result that may hold workflow values (a group's results, with
    :class:`MemberFailure` in place of members that did not complete), checking it against
    ``type_``."""
    try:
        value = _any_decoder.decode(data)
        return value if type_ is Any else msgspec.convert(value, type_, strict=True)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
        raise SerializationError(f"cannot decode {type_!r}: {exc}") from exc


def decode_envelope(data: bytes) -> Envelope:
    """Decode a job envelope, raising :class:`SerializationError` for anything else."""
    try:
        return _envelope_decoder.decode(data)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise SerializationError(f"undecodable job envelope: {exc}") from exc


def decode_error(data: bytes) -> ErrorInfo:
    """Decode a recorded error; unreadable records become a descriptive ErrorInfo."""
    try:
        return _error_decoder.decode(data)
    except (msgspec.DecodeError, RecursionError):
        return ErrorInfo("UnreadableError", repr(data[:200]))


class BadSignature(SerializationError):
    """A job's signature is missing or matches none of the worker's signing keys."""


# A byte msgpack never produces: a signed job starts with it, then its 32-byte tag.
_SIGNED = b"\xc1"
_TAG = 32


class Signer:
    """Signs jobs with HMAC-SHA256 and checks them, for queues with a ``signing_key``.

    The tag covers the job id and the envelope, so a signed envelope cannot be replayed
    under another id. Several keys allow rotation: the first signs, any one verifies.
    Without keys, nothing is signed and signed jobs are accepted without a check.
    """

    def __init__(self, keys: str = "") -> None:
        self._keys = [key.strip().encode() for key in keys.split(",") if key.strip()]

    def __bool__(self) -> bool:
        return bool(self._keys)

    def _tag(self, key: bytes, job_id: str, payload: bytes) -> bytes:
        return hmac.new(key, job_id.encode() + b"\0" + payload, hashlib.sha256).digest()

    def seal(self, job_id: str, payload: bytes) -> bytes:
        """The envelope as stored: signed when there is a key."""
        if not self._keys:
            return payload
        return _SIGNED + self._tag(self._keys[0], job_id, payload) + payload

    def open(self, job_id: str, stored: bytes) -> bytes:
        """The envelope inside a stored job, or :class:`BadSignature`."""
        if stored[:1] == _SIGNED:
            tag, payload = stored[1 : 1 + _TAG], stored[1 + _TAG :]
            expected = (self._tag(key, job_id, payload) for key in self._keys)
            if self._keys and not any(hmac.compare_digest(tag, e) for e in expected):
                raise BadSignature(f"job {job_id}: its signature matches no signing key")
            return payload
        if self._keys:
            raise BadSignature(f"job {job_id} is not signed, and this queue requires it")
        return stored


# Stands for the argument a workflow step is fed at run time, while binding the others.
_FED: Any = object()


class Signature:
    """A task function's signature, used to bind and type-check arguments.

    The first parameter (the :class:`~aioqueue.Context`) is left out. Arguments are converted
    with msgspec against the annotations, so an ``int`` parameter refuses ``"x"`` both when a
    producer that knows the task enqueues it and when the worker decodes it.
    """

    def __init__(self, func: Callable[..., Any], task_name: str) -> None:
        self.task_name = task_name
        full = inspect.signature(func)
        params = list(full.parameters.values())[1:]
        self.signature = full.replace(parameters=params)
        try:
            hints = typing.get_type_hints(func)
        except Exception:
            hints = {}
        self.return_type: Any = hints.get("return", Any)
        if self.return_type is None or self.return_type is type(None):
            self.return_type = Any
        self._types: dict[str, Any] = {}
        for param in params:
            annotation = hints.get(param.name, Any)
            if param.kind is inspect.Parameter.VAR_POSITIONAL:
                annotation = tuple[annotation, ...]  # type: ignore[valid-type]
            elif param.kind is inspect.Parameter.VAR_KEYWORD:
                annotation = dict[str, annotation]  # type: ignore[valid-type]
            supported = _msgspec_supports(annotation)
            if not supported and "MemberFailure" in repr(annotation):
                # Silently unchecked, a callback would get plain dicts for its results.
                raise ConfigurationError(
                    f"task {task_name!r}: parameter {param.name!r}: msgspec cannot tell "
                    f"MemberFailure apart from the other types in {annotation!r}: results "
                    "that are msgspec Structs cannot share a union with it; return a "
                    "dataclass or a dict, or take list[Any] and check isinstance"
                )
            self._types[param.name] = annotation if supported else Any
        self._typed = any(t is not Any for t in self._types.values())
        # Fast path for the common shape: plain positional parameters without defaults, called
        # with exactly that many positional arguments. One msgspec call checks them all.
        plain = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        self._arity: int | None = (
            len(params)
            if all(p.kind in plain and p.default is inspect.Parameter.empty for p in params)
            else None
        )
        types = tuple(self._types[p.name] for p in params)
        # tuple[types] spelled for the type checker, which cannot follow a runtime tuple.
        self._tuple_type: Any = tuple.__class_getitem__(types) if params else None

    def bind(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Bind and convert arguments to ``(args, kwargs)``, raising :class:`InvalidArguments`
        when they do not fit."""
        if not kwargs and len(args) == self._arity:
            if not self._typed:
                return tuple(args), {}
            try:
                return msgspec.convert(args, self._tuple_type, strict=True), {}
            except msgspec.ValidationError:
                pass  # the slow path below names the offending parameter
        bound = self._bind_slow(args, kwargs)
        return bound.args, bound.kwargs

    def bind_fed(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Bind the arguments of a workflow step whose first argument a dependency will feed
        at run time (it is checked then): everything after it, converted as :meth:`bind`
        does."""
        params = list(self.signature.parameters.values())
        positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        if not params or params[0].kind not in positional:
            raise InvalidArguments(
                f"task {self.task_name!r} takes no positional argument for the result it is fed"
            )
        bound = self._bind_slow((_FED, *args), kwargs)
        return bound.args[1:], bound.kwargs

    def _bind_slow(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> inspect.BoundArguments:
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise InvalidArguments(f"task {self.task_name!r}: {exc}") from exc
        if self._typed:
            for name, value in bound.arguments.items():
                type_ = self._types[name]
                if type_ is Any or value is _FED:
                    continue
                try:
                    bound.arguments[name] = msgspec.convert(value, type_, strict=True)
                except msgspec.ValidationError as exc:
                    raise InvalidArguments(
                        f"task {self.task_name!r}: argument {name!r}: {exc}"
                    ) from exc
        return bound


def _msgspec_supports(annotation: Any) -> bool:
    if annotation is Any or annotation is inspect.Parameter.empty:
        return False
    try:
        msgspec.inspect.type_info(annotation)
    except (TypeError, ValueError):
        return False
    return True
