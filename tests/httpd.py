"""What every HTTP server in the tests shares."""

from __future__ import annotations

from http.server import BaseHTTPRequestHandler


class QuietHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 keep-alive, no request log on stderr, and TCP_NODELAY: a handler writes headers and
    body separately, and without it Nagle and delayed ACKs hold a small answer back 40-250 ms,
    which the benchmark would count as modelcar's time."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, *args: object) -> None:
        pass
