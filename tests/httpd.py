"""What every HTTP server in the tests shares."""

from __future__ import annotations

import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class QuietHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 keep-alive, no request log on stderr, and TCP_NODELAY: a handler writes headers and
    body separately, and without it Nagle and delayed ACKs hold a small answer back 40-250 ms,
    which the benchmark would count as modelcar's time."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, *args: object) -> None:
        pass


class QuietServer(ThreadingHTTPServer):
    """A client that went away (a reset, a closed pipe: what a cut-off read or a dropped fault
    does) is no server error: it is not logged as one, with a traceback in the test output."""

    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]
