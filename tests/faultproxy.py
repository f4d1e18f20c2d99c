"""A fault-injecting HTTP reverse proxy for tests, on its own loopback port in front of one upstream.

Every request is forwarded (method, path and query, headers, streamed body) on a fresh upstream
connection, and the response is streamed back; `Location` headers pointing at the upstream are
rewritten to point at the proxy. Bodies are never held in memory whole: a request body with
Content-Length or `Transfer-Encoding: chunked` is copied through in 1 MiB pieces (a chunked one is
forwarded chunked).

Faults are queued rules, matched in order by method and a regular expression searched in the path
(with its query), each good for `times` requests:
  status   answer `status` (with `headers`, e.g. 429 + Retry-After, or 503) after reading and
           discarding the request body, without contacting the upstream
  drop     read `after_bytes` of the request body (default: half of it, or 64 KiB if chunked;
           0 for none), then close the connection without answering
  stall    hold the request, its body unread, for `seconds` (or until `release()`), then forward it
  restatus forward it, and pass the upstream's answer on under another status (`status`)
  cut      forward it, pass on the answer's headers and `after_bytes` of its body, then close the
           connection (a transfer that dies midway)
  trickle  forward it, and pass on the answer's body a byte at a time, `rate` bytes a second (a
           transfer that never stops and never times out)
A rule with `skip=N` passes over its first N matching requests (e.g. "the second PATCH"); a later
rule may still take them.
All requests are recorded as (method, path) in `requests`; `exchanges` adds status, fault and time.
"""

from __future__ import annotations

import contextlib
import http.client
import re
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from urllib.parse import urlsplit

from tests.httpd import QuietHandler, QuietServer

PIECE = 1 << 20  # relayed at a time: the benchmark's proxy shares 2 cores with what it measures
DROP_CHUNKED = 64 * 1024  # a chunked body's default `drop` point
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "expect",
}


@dataclass
class Fault:
    path: str  # regex, searched in the request path (with query)
    method: str | None = None  # None: any method
    # "status" | "drop" | "stall" | "restatus" | "cut" | "trickle" | "reheader" | "relocate" | "unrange"
    kind: str = "status"
    times: int = 1
    status: int = 503
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b'{"errors":[{"code":"UNAVAILABLE","message":"injected fault"}]}'
    after_bytes: int | None = None  # "drop": request body bytes read before closing
    seconds: float = 0.0  # "stall": how long to hold the request
    rate: float = 0.0  # "trickle": the answer's bytes a second
    skip: int = 0  # matching requests to let through before this rule applies
    relocate: Callable[[str], str] | None = None  # "relocate": the answer's Location, rewritten
    hits: int = 0  # requests this fault has answered

    def matches(self, method: str, path: str) -> bool:
        return (
            self.times > 0 and (self.method is None or self.method == method) and re.search(self.path, path) is not None
        )


@dataclass
class Exchange:
    method: str
    path: str
    status: int | None = None  # None: dropped, or the upstream failed mid-response
    fault: str | None = None  # the injected fault's kind, if any
    request_bytes: int = 0  # request body bytes read from the client
    time: float = field(default_factory=time.monotonic)  # when the request line arrived
    host: str = ""  # the Host header: the name the client used
    authorization: str | None = None  # the Authorization header the client sent
    content_range: str | None = None  # the Content-Range header the client sent (a chunk's)
    range: str | None = None  # the Range header the client sent
    response_bytes: int = 0  # answer body bytes relayed to the client


class FaultProxy:
    def __init__(
        self,
        upstream: str,
        *,
        ssl_context: ssl.SSLContext | None = None,
        timeout: float = 120.0,
        location: str | None = None,
    ) -> None:
        """`location`: the origin `Location` headers pointing at the upstream are rewritten to
        (default: this proxy's URL), e.g. the proxy under another name, as a registry whose upload
        sessions live on another host."""
        parts = urlsplit(upstream)
        self.upstream = f"{parts.scheme}://{parts.netloc}"
        self.upstream_scheme = parts.scheme
        self.upstream_host = parts.netloc
        self.ssl_context = ssl_context
        self.timeout = timeout
        self.location = location
        self.faults: list[Fault] = []
        self.requests: list[tuple[str, str]] = []
        self.exchanges: list[Exchange] = []
        self._lock = threading.Lock()
        self._released = threading.Event()  # set: stalled requests go on at once
        proxy = self

        class Handler(QuietHandler):
            def handle_one_request(self) -> None:
                # All methods, without a do_X method each.
                try:
                    self.raw_requestline = self.rfile.readline(65537)
                    if not self.raw_requestline:
                        self.close_connection = True
                        return
                    if not self.parse_request():
                        return
                    proxy._handle(self)
                    self.wfile.flush()
                except (OSError, http.client.HTTPException):
                    self.close_connection = True  # the client or the upstream went away mid-exchange

        self.server = QuietServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread: threading.Thread | None = None

    # --- control ----------------------------------------------------------------------------------

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def start(self) -> FaultProxy:
        if self.thread is None:
            self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
            self.thread.start()
        return self

    def stop(self) -> None:
        self.release()
        if self.thread is not None:
            self.server.shutdown()
            self.thread.join()
            self.thread = None
        self.server.server_close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def inject(self, fault: Fault) -> Fault:
        with self._lock:
            self.faults.append(fault)
        return fault

    def fail(
        self,
        method: str | None,
        path: str,
        status: int = 503,
        *,
        times: int = 1,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
        skip: int = 0,
    ) -> Fault:
        """Answer the next `times` matching requests (after `skip` of them) with `status`."""
        fault = Fault(path, method, "status", times, status, dict(headers or {}), skip=skip)
        if body is not None:
            fault.body = body
        return self.inject(fault)

    def fail_429(
        self, method: str | None, path: str, *, retry_after: str | int = 1, times: int = 1, skip: int = 0
    ) -> Fault:
        body = b'{"errors":[{"code":"TOOMANYREQUESTS","message":"injected fault"}]}'
        headers = {"Retry-After": str(retry_after)}
        return self.fail(method, path, 429, times=times, headers=headers, body=body, skip=skip)

    def fail_503(
        self,
        method: str | None,
        path: str,
        *,
        times: int = 1,
        retry_after: str | int | None = None,
        skip: int = 0,
    ) -> Fault:
        headers = {} if retry_after is None else {"Retry-After": str(retry_after)}
        return self.fail(method, path, 503, times=times, headers=headers, skip=skip)

    def drop(
        self, method: str | None, path: str, *, after_bytes: int | None = None, times: int = 1, skip: int = 0
    ) -> Fault:
        """Close the connection, unanswered, after reading `after_bytes` of the request body."""
        return self.inject(Fault(path, method, "drop", times, after_bytes=after_bytes, skip=skip))

    def restatus(self, method: str | None, path: str, status: int, *, times: int = 1, skip: int = 0) -> Fault:
        """Forward the next `times` matching requests; answer with the upstream's headers and body
        under `status` (a registry that says 201 where another says 202)."""
        return self.inject(Fault(path, method, "restatus", times, status, skip=skip))

    def reheader(self, method: str | None, path: str, headers: dict[str, str], *, times: int = 1) -> Fault:
        """Forward the next `times` matching requests; answer with the upstream's response, these
        headers replacing its own (a registry or proxy that labels a manifest application/json)."""
        return self.inject(Fault(path, method, "reheader", times, headers=dict(headers)))

    def relocate(self, method: str | None, path: str, rewrite: Callable[[str], str], *, times: int = 1) -> Fault:
        """Forward the next `times` matching requests; pass the answer's Location header on as
        `rewrite` makes it (a registry that answers with a relative one)."""
        return self.inject(Fault(path, method, "relocate", times, relocate=rewrite))

    def cut(self, method: str | None, path: str, *, after_bytes: int, times: int = 1, skip: int = 0) -> Fault:
        """Forward the next `times` matching requests; close each answer after `after_bytes` of its body."""
        return self.inject(Fault(path, method, "cut", times, after_bytes=after_bytes, skip=skip))

    def trickle(self, method: str | None, path: str, *, rate: float, times: int = 1) -> Fault:
        """Forward the next `times` matching requests; pass each answer's body on at `rate` bytes a second."""
        return self.inject(Fault(path, method, "trickle", times, rate=rate))

    def unrange(self, method: str | None, path: str, *, times: int = 1) -> Fault:
        """Forward the next `times` matching requests without their Range header (a registry, or a
        proxy in front of one, that sends the whole blob)."""
        return self.inject(Fault(path, method, "unrange", times))

    def stall(self, method: str | None, path: str, *, seconds: float = 60.0, times: int = 1, skip: int = 0) -> Fault:
        """Hold the next `times` matching requests (after `skip` of them) for `seconds`, then forward them."""
        self._released.clear()
        return self.inject(Fault(path, method, "stall", times, seconds=seconds, skip=skip))

    def release(self) -> None:
        """Let every stalled request go on now."""
        self._released.set()

    def stalled(self) -> list[Exchange]:
        """Requests held by a stall rule and not yet released."""
        with self._lock:
            return [e for e in self.exchanges if e.fault == "stall" and e.status is None]

    def pending(self) -> list[Fault]:
        """Faults not yet used up."""
        with self._lock:
            return [f for f in self.faults if f.times > 0]

    def clear(self) -> None:
        """Forget the rules and the records (stalled requests go on)."""
        self.release()
        with self._lock:
            self.faults.clear()
            self.requests.clear()
            self.exchanges.clear()

    def count(self, method: str | None = None, path: str = "") -> int:
        """Requests seen with `method` (None: any) whose path (with query) matches the regex `path`."""
        with self._lock:
            return sum(1 for m, p in self.requests if (method is None or m == method) and re.search(path, p))

    # --- serving ----------------------------------------------------------------------------------

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.matches(method, path):
                    if fault.skip > 0:
                        fault.skip -= 1
                        continue
                    fault.times -= 1
                    fault.hits += 1
                    return fault
        return None

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        method, path = h.command, h.path
        exchange = Exchange(
            method,
            path,
            host=h.headers.get("Host", ""),
            authorization=h.headers.get("Authorization"),
            content_range=h.headers.get("Content-Range"),
            range=h.headers.get("Range"),
        )
        with self._lock:
            self.requests.append((method, path))
            self.exchanges.append(exchange)
        body = _body_reader(h)
        fault = self._take_fault(method, path)
        if fault is not None:
            exchange.fault = fault.kind
            if fault.kind == "drop":
                return self._drop(h, body, fault, exchange)
            if fault.kind == "stall":
                self._released.wait(fault.seconds)
                return self._forward(h, body, exchange)
            if fault.kind == "restatus":
                return self._forward(h, body, exchange, status=fault.status)
            if fault.kind == "cut":
                return self._forward(h, body, exchange, cut=fault.after_bytes)
            if fault.kind == "trickle":
                return self._forward(h, body, exchange, rate=fault.rate)
            if fault.kind == "reheader":
                return self._forward(h, body, exchange, headers=fault.headers)
            if fault.kind == "relocate":
                return self._forward(h, body, exchange, relocate=fault.relocate)
            if fault.kind == "unrange":
                return self._forward(h, body, exchange, ranges=False)
            for piece in body:
                exchange.request_bytes += len(piece)
            exchange.status = fault.status
            h.send_response(fault.status)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(fault.body)))
            for k, v in fault.headers.items():
                h.send_header(k, v)
            h.end_headers()
            if method != "HEAD":
                h.wfile.write(fault.body)
            return None
        return self._forward(h, body, exchange)

    def _drop(self, h: BaseHTTPRequestHandler, body: BodyReader, fault: Fault, exchange: Exchange) -> None:
        limit = fault.after_bytes
        if limit is None:
            limit = body.length // 2 if body.length is not None else DROP_CHUNKED
        if limit > 0:
            for piece in body.read_upto(limit):
                exchange.request_bytes += len(piece)
        h.close_connection = True
        # Closing with unread data makes the kernel reset the connection, as a crashed server would.
        h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with contextlib.suppress(OSError):
            h.connection.shutdown(socket.SHUT_RDWR)

    def _forward(
        self,
        h: BaseHTTPRequestHandler,
        body: BodyReader,
        exchange: Exchange,
        status: int | None = None,
        cut: int | None = None,
        headers: dict[str, str] | None = None,
        relocate: Callable[[str], str] | None = None,
        ranges: bool = True,
        rate: float = 0.0,
    ) -> None:
        if self.upstream_scheme == "https":
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                self.upstream_host, timeout=self.timeout, context=self.ssl_context
            )
        else:
            conn = http.client.HTTPConnection(self.upstream_host, timeout=self.timeout)
        try:
            try:
                conn.connect()
                conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # body pieces go at once
                conn.putrequest(h.command, h.path, skip_host=True, skip_accept_encoding=True)
                conn.putheader("Host", self.upstream_host)
                dropped = {*HOP_BY_HOP, "host", "content-length", *(() if ranges else ("range",))}
                for k, v in h.headers.items():
                    if k.lower() not in dropped:
                        conn.putheader(k, v)
                if body.length is not None:
                    conn.putheader("Content-Length", str(body.length))
                elif body.chunked:
                    conn.putheader("Transfer-Encoding", "chunked")
                conn.endheaders()
                try:
                    for piece in body:
                        exchange.request_bytes += len(piece)
                        conn.send(b"%x\r\n%b\r\n" % (len(piece), piece) if body.chunked else piece)
                    if body.chunked:
                        conn.send(b"0\r\n\r\n")
                except OSError:
                    # The upstream may have answered early and closed (e.g. 401, 404): read the rest of the
                    # client's body, as the upstream would have, and pass the answer on if there is one.
                    for piece in body:
                        exchange.request_bytes += len(piece)
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException) as e:
                if body.remaining:  # the client is still sending: this connection cannot be reused
                    h.close_connection = True
                message = f'{{"errors":[{{"code":"BAD_GATEWAY","message":"{type(e).__name__}"}}]}}'.encode()
                exchange.status = 502
                h.send_response(502)
                h.send_header("Content-Type", "application/json")
                h.send_header("Content-Length", str(len(message)))
                h.end_headers()
                h.wfile.write(message)
                return
            exchange.status = status or resp.status
            self._respond(h, resp, exchange, status, cut, headers, relocate, rate)
        finally:
            conn.close()

    def _respond(
        self,
        h: BaseHTTPRequestHandler,
        resp: http.client.HTTPResponse,
        exchange: Exchange,
        status: int | None = None,
        cut: int | None = None,
        headers: dict[str, str] | None = None,
        relocate: Callable[[str], str] | None = None,
        rate: float = 0.0,
    ) -> None:
        h.send_response_only(status or resp.status, None if status else resp.reason)
        length = resp.getheader("Content-Length")
        replaced = {k.lower(): v for k, v in (headers or {}).items()}
        for k, v in resp.getheaders():
            lk = k.lower()
            if lk in HOP_BY_HOP or lk == "content-length":
                continue
            v = replaced.get(lk, v)
            if lk == "location" and v.startswith(self.upstream):
                v = (self.location or self.url) + v[len(self.upstream) :]
            if lk == "location" and relocate is not None:
                v = relocate(v)
            h.send_header(k, v)
        no_body = h.command == "HEAD" or resp.status in (204, 304) or 100 <= resp.status < 200
        if length is not None:
            h.send_header("Content-Length", length)
        elif not no_body:
            h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        if no_body:
            return
        sent = 0
        while True:
            piece = resp.read1(PIECE) if length is None else resp.read(PIECE)
            if not piece:
                break
            if cut is not None and sent + len(piece) >= cut:
                piece = piece[: cut - sent]
                h.wfile.write(b"%x\r\n%b\r\n" % (len(piece), piece) if length is None else piece)
                exchange.response_bytes += len(piece)
                h.wfile.flush()
                h.close_connection = True
                h.connection.shutdown(socket.SHUT_RDWR)
                return
            sent += len(piece)
            if rate:
                for i in range(len(piece)):
                    h.wfile.write(b"1\r\n%b\r\n" % piece[i : i + 1] if length is None else piece[i : i + 1])
                    h.wfile.flush()
                    exchange.response_bytes += 1
                    time.sleep(1 / rate)
                continue
            h.wfile.write(b"%x\r\n%b\r\n" % (len(piece), piece) if length is None else piece)
            exchange.response_bytes += len(piece)
        if length is None:
            h.wfile.write(b"0\r\n\r\n")


class BodyReader:
    """The request body, read in pieces: Content-Length, chunked, or none."""

    def __init__(self, h: BaseHTTPRequestHandler) -> None:
        self.rfile = h.rfile
        te = h.headers.get("Transfer-Encoding", "").lower()
        self.chunked = "chunked" in te
        cl = h.headers.get("Content-Length")
        self.length: int | None = None if self.chunked or cl is None else int(cl)
        self._left = self.length or 0  # bytes of the body (or current chunk) not read yet
        self._done = not self.chunked and not self._left

    @property
    def remaining(self) -> bool:
        return not self._done

    def __iter__(self) -> Iterator[bytes]:
        return self.read_upto(None)

    def read_upto(self, limit: int | None) -> Iterator[bytes]:
        """Yield body pieces until the body ends or `limit` bytes were yielded."""
        got = 0
        while not self._done and (limit is None or got < limit):
            want = PIECE if limit is None else min(PIECE, limit - got)
            if self.chunked and self._left == 0:
                size_line = self.rfile.readline(1024)
                if not size_line:
                    raise ConnectionError("client closed mid-body")
                size = int(size_line.split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    self._done = True
                    return
                self._left = size
            piece = self.rfile.read(min(want, self._left))
            if not piece:
                raise ConnectionError("client closed mid-body")
            self._left -= len(piece)
            got += len(piece)
            if self._left == 0:
                if self.chunked:
                    self.rfile.readline(1024)  # the CRLF after a chunk
                else:
                    self._done = True
            yield piece


def _body_reader(h: BaseHTTPRequestHandler) -> BodyReader:
    return BodyReader(h)
