"""What a server sends is read within bounds: at a pace, and up to a size.

A server (a registry, the Hub, a CDN, whatever stands between) that sends a byte a second never
trips a read timeout, and held a run past --retry-deadline; one that sends without end filled the
memory of whoever read its answer whole.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Protocol

STALL_BYTES = 64 << 10  # what a transfer must move in each STALL_WINDOW seconds (~1 KiB/s)
STALL_WINDOW = 60.0


def paced(chunks: Iterable[bytes], window: float = STALL_WINDOW) -> Iterator[bytes]:
    """`chunks`, unless fewer than STALL_BYTES come in some `window` seconds of waiting for them: a
    server that sends a byte a second never trips a read timeout, and held a run past
    --retry-deadline. Only the wait counts, not the reader's own time between chunks (a slow disk,
    a file hashed meanwhile). The stall is a TimeoutError: retried as a dropped connection is."""
    pending = iter(chunks)
    waited, moved = 0.0, 0
    while True:
        asked = time.monotonic()
        chunk = next(pending, None)
        if chunk is None:
            return
        waited += time.monotonic() - asked
        moved += len(chunk)
        if waited >= window:
            if moved < STALL_BYTES:
                raise TimeoutError(f"the transfer stalled: {moved} bytes in {waited:.0f} s")
            waited, moved = 0.0, 0
        yield chunk


class Streamed(Protocol):
    """A streamed HTTP answer: httpx's, or huggingface_hub 2.x's own copy of it (httpx2)."""

    def iter_bytes(self) -> Iterator[bytes]: ...


def read_capped(response: Streamed, cap: int, window: float = STALL_WINDOW) -> bytes | None:
    """A streamed answer's body, None past `cap` bytes (a server sending without end is cut off
    there, as containerd cuts a manifest off at 4 MiB); a TimeoutError if it stalls (paced)."""
    body = bytearray()
    for chunk in paced(response.iter_bytes(), window):
        body += chunk
        if len(body) > cap:
            return None
    return bytes(body)
