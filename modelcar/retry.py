"""Retries for remote calls: 429, 5xx and dropped connections, the way servers ask for them.

A shared egress IP hitting the Hub gets 429s with `Retry-After` (or the IETF `RateLimit` header),
and CDNs drop connections mid-file. huggingface_hub retries only some of these, so every remote
call modelcar makes goes through `call_with_retry`: the server's wait hint when it gives one,
exponential backoff with full jitter otherwise, a cap on attempts and a total deadline.
"""

from __future__ import annotations

import contextvars
import logging
import random
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, Generic, TypeVar
from urllib.parse import urlsplit

from modelcar.errors import ModelcarError

log = logging.getLogger("modelcar")

T = TypeVar("T")

RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 8
    deadline: float = 900.0  # seconds for one call, all attempts and waits included
    base_delay: float = 1.0
    max_delay: float = 60.0


class RetryGiveUp(ModelcarError):
    """The call kept failing with retryable errors until the cap or the deadline."""

    def __init__(self, message: str, last: BaseException) -> None:
        super().__init__(message)
        self.last = last


# The run a retry loop belongs to: its stop event, set when the run is interrupted. A context
# variable, handed to the run's worker threads with each task (RunPool, in_run): another run in
# the same process (a library caller's) is not stopped with it.
_run_stop: ContextVar[threading.Event | None] = ContextVar("modelcar_run_stop", default=None)
_NEVER = threading.Event()  # the stop event of a call outside any run: never set


class RunPool(ThreadPoolExecutor):
    """A thread pool whose tasks run in the context they were submitted from: they belong to the
    submitter's run (see run_scope)."""

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        return super().submit(contextvars.copy_context().run, fn, *args, **kwargs)


def in_run(stop: threading.Event, fn: Callable[..., T]) -> Callable[..., T]:
    """`fn`, run as part of the run whose stop event is `stop` (for a pool that outlives a `with`)."""

    def run(*args: Any, **kwargs: Any) -> T:
        token = _run_stop.set(stop)
        try:
            return fn(*args, **kwargs)
        finally:
            _run_stop.reset(token)

    return run


def current_run() -> threading.Event:
    """The stop event of the run the caller is in; a new one (a run of its own) outside any."""
    return _run_stop.get() or threading.Event()


@contextmanager
def run_scope() -> Iterator[threading.Event]:
    """The run the body belongs to: the caller's, or a new one; its stop event. Interrupted
    (KeyboardInterrupt, SystemExit), the run's retry loops give up at their next wait instead of
    sleeping up to --retry-deadline in threads the interpreter joins at exit: those waiting now,
    and those its workers start afterwards (a request that was in flight fails, then retries)."""
    stop = current_run()
    token = _run_stop.set(stop)
    try:
        yield stop
    except (KeyboardInterrupt, SystemExit):
        stop.set()
        raise
    finally:
        _run_stop.reset(token)


K = TypeVar("K")


class Flights(Generic[K, T]):
    """Each key's answer asked for once, however many threads want it at once, and kept for the
    run; a failure is not kept: a later asker asks again."""

    def __init__(self) -> None:
        self._flights: dict[K, Future[T]] = {}
        self._lock = threading.Lock()

    def once(self, key: K, ask: Callable[[], T]) -> T:
        with self._lock:
            flight = self._flights.get(key)
            first = flight is None
            if flight is None:
                flight = self._flights[key] = Future()
        if first:
            try:
                flight.set_result(ask())
            except BaseException as exc:
                with self._lock:
                    del self._flights[key]
                flight.set_exception(exc)
        return flight.result()


@contextmanager
def worker_pool(workers: int, name: str = "") -> Iterator[ThreadPoolExecutor]:
    """A thread pool for the body of a `with`, in the caller's run. Interrupted, it does not wait
    for its workers: what is queued is dropped and their retries give up (run_scope); a transfer
    in flight ends on its own. Otherwise it waits, as any pool does."""
    with run_scope():
        pool = RunPool(max(1, workers), thread_name_prefix=name)
        try:
            yield pool
            pool.shutdown(wait=True)
        except (KeyboardInterrupt, SystemExit):
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        except BaseException:
            pool.shutdown(wait=True)
            raise


def cause_chain(exc: BaseException) -> list[BaseException]:
    """`exc` and each exception it came from (its cause, else its context), each once."""
    out: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in out:
        out.append(cur)
        cur = cur.__cause__ or cur.__context__
    return out


def http_status(exc: BaseException) -> tuple[int, Mapping[str, str]] | None:
    """The HTTP status and headers behind an exception, searching its cause chain."""
    for e in cause_chain(exc):
        response: Any = getattr(e, "response", None)
        status = getattr(response, "status_code", None)
        if isinstance(status, int):
            return status, getattr(response, "headers", {}) or {}
    return None


def request_host(exc: BaseException) -> str | None:
    """The host the request behind an exception went to (its last hop, after redirects), searching
    its cause chain: httpx's and huggingface_hub's errors carry the request, or the response."""
    for e in cause_chain(exc):
        for holder in (getattr(e, "response", None), e):
            try:
                request = getattr(holder, "request", None)
            except RuntimeError:  # httpx: an error raised with no request to it
                continue
            if (host := urlsplit(str(getattr(request, "url", ""))).hostname) is not None:
                return host
    return None


def broke_off(exc: BaseException) -> bool:
    """Whether a request failed on a connection that was made and then broke (the peer closed it
    mid-answer, or reset it): unlike a refusal, a proxy's block, a name not found or a timeout,
    which are the network's way there."""
    for e in cause_chain(exc):
        module = type(e).__module__.split(".")[0]
        if module in ("httpx", "httpx2", "httpcore", "httpcore2") and type(e).__name__ in (
            "RemoteProtocolError",
            "ReadError",
        ):
            return True
    return False


def is_connection_error(exc: BaseException) -> bool:
    """Whether `exc` (or what it came from) is the network's: no answer, a connection that broke, a timeout."""
    for e in cause_chain(exc):
        name = type(e).__name__
        module = type(e).__module__.split(".")[0]
        if module in ("httpx", "httpx2", "httpcore") and (
            "Timeout" in name
            or "Connect" in name
            or "Read" in name
            or "Write" in name
            or "Protocol" in name
            or "Network" in name
            or name in ("TransportError", "RemoteProtocolError")
        ):
            return True
        if isinstance(e, ConnectionError | TimeoutError):
            return True
    return False


def never_connected(exc: BaseException) -> bool:
    """Whether `exc` (or what it came from) is a connection that never opened: nothing listening,
    no route, no answer to the handshake. Not a transfer that broke off or stalled (a proxy that
    cuts one huge blob says nothing of the next request)."""
    for e in cause_chain(exc):
        if isinstance(e, ConnectionRefusedError) or (
            type(e).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "httpcore2")
            and type(e).__name__.startswith("Connect")
        ):
            return True
    return False


class Unreachable:
    """A server that could not be connected to for a whole retried call is not asked again in the
    run (one client's life): a registry that was down held `push` 2 min 45 s, each of its requests
    retried in turn, and looked hung."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.why: str | None = None

    def check(self, what: str, error: type[ModelcarError] = ModelcarError) -> None:
        if self.why is not None:
            raise error(f"{what}: not tried: {self.name} could not be reached earlier in this run ({self.why})")

    def note(self, exc: RetryGiveUp) -> None:
        if never_connected(exc.last):
            self.why = describe_failure(exc.last)


# getaddrinfo's answers that a retry will not change: the name does not exist (a typo'd registry
# or HF_ENDPOINT). EAI_AGAIN, a resolver that did not answer in time, is retried.
_NO_SUCH_NAME = frozenset(getattr(socket, n) for n in ("EAI_NONAME", "EAI_NODATA") if hasattr(socket, n))


def is_retryable(exc: BaseException) -> bool:
    status = http_status(exc)
    if status is not None:
        return status[0] in RETRY_STATUS
    if any(isinstance(e, socket.gaierror) and e.errno in _NO_SUCH_NAME for e in cause_chain(exc)):
        return False
    return is_connection_error(exc)


_RATELIMIT_T = re.compile(r"(?:^|[;,\s])t=(\d+)")
_RATELIMIT_R = re.compile(r"(?:^|[;,\s])r=(\d+)")


def server_delay(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds the server asked us to wait: `Retry-After` (seconds or HTTP date), else `RateLimit`.

    `RateLimit: "api";r=0;t=42` (draft-ietf-httpapi-ratelimit-headers, used by the Hub) means
    no requests left for 42 seconds; `RateLimit-Reset: 42` is the older spelling.
    """
    lower = {k.lower(): v for k, v in headers.items()}
    retry_after = lower.get("retry-after")
    if retry_after:
        value = retry_after.strip()
        try:
            return max(0.0, float(value))  # delay-seconds (some servers send a fraction)
        except ValueError:
            pass
        try:
            when = parsedate_to_datetime(value).timestamp()
        except (TypeError, ValueError, IndexError):
            when = None
        if when is not None:
            return max(0.0, when - (time.time() if now is None else now))
    ratelimit = lower.get("ratelimit")
    if ratelimit:
        # one item per policy ("api";r=10;t=300, "resolvers";r=0;t=30): wait for the longest
        # reset among the policies that have no request left
        waits = []
        for policy in ratelimit.split(","):
            remaining = _RATELIMIT_R.search(policy)
            reset = _RATELIMIT_T.search(policy)
            if reset and (remaining is None or remaining.group(1) == "0"):
                waits.append(float(reset.group(1)))
        if waits:
            return max(waits)
    reset_header = lower.get("ratelimit-reset")
    if reset_header and reset_header.strip().isdigit():
        return float(reset_header.strip())
    return None


def backoff_delay(attempt: int, policy: RetryPolicy, rng: random.Random | None = None) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(cap, base * 2**attempt)]."""
    ceiling = min(policy.max_delay, policy.base_delay * (2**attempt))
    return (rng or random).uniform(0.0, ceiling)


def describe_failure(exc: BaseException) -> str:
    status = http_status(exc)
    if status is not None:
        # what the server's error document said, where the exception kept it (a registry's answer)
        said = next((text for e in cause_chain(exc) if isinstance(text := getattr(e, "said", None), str) and text), "")
        return f"HTTP {status[0]}: {said}" if said else f"HTTP {status[0]}"
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:200]


def call_with_retry(
    fn: Callable[[], T],
    what: str,
    policy: RetryPolicy,
    *,
    sleep: Callable[[float], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """Call `fn`, retrying retryable failures; non-retryable errors propagate at once.

    The deadline counts from the first failure: a transfer that ran for an hour before its
    connection dropped is retried like a quick request that failed at once. The waits end early
    when the call's run is interrupted (run_scope): the call then gives up."""
    stop = _run_stop.get() or _NEVER
    start: float | None = None
    attempt = 0
    while True:
        try:
            return fn()
        except Exception as exc:
            if not is_retryable(exc):
                raise
            status = http_status(exc)
            hint = server_delay(status[1]) if status else None
            delay = hint if hint is not None else backoff_delay(attempt, policy)
            if start is None:
                start = clock()
            elapsed = clock() - start
            reason = describe_failure(exc)
            if attempt >= policy.max_retries:
                raise RetryGiveUp(
                    f"{what}: still failing after {attempt + 1} attempt{'s' if attempt else ''} ({reason}); "
                    f"raise --max-retries or try again later",
                    exc,
                ) from exc
            if elapsed + delay > policy.deadline:
                raise RetryGiveUp(
                    f"{what}: {reason}; the server asks to wait {delay:.0f}s, past the "
                    f"{policy.deadline:.0f}s retry deadline (--retry-deadline)"
                    if hint is not None
                    else f"{what}: still failing after {elapsed:.0f}s ({reason}); the "
                    f"{policy.deadline:.0f}s retry deadline is reached (--retry-deadline)",
                    exc,
                ) from exc
            if stop.is_set():
                raise RetryGiveUp(f"{what}: {reason}; not retried: interrupted", exc) from exc
            attempt += 1
            log.warning("%s: %s; retry %d/%d in %.1fs", what, reason, attempt, policy.max_retries, delay)
            if sleep is not None:
                sleep(delay)
            elif stop.wait(delay):
                raise RetryGiveUp(f"{what}: {reason}; not retried: interrupted", exc) from exc
