"""How much an HTTP/1.1 connection reads from its socket at a time, for bulk downloads.

httpcore (our registry client's HTTP stack) and httpcore2 (huggingface_hub's) read 64 KiB per
`recv` and hand each piece through h11 and the client's iterators to the file being written:
~16,000 rounds of Python per GiB. Reading 256 KiB at a time makes that a quarter. Measured on
2 cores, 1 GiB over plain HTTP on loopback: huggingface_hub download 1.2-1.6 s / 1.8-2.3 CPU-s ->
0.76-0.86 s / 1.1-1.2 CPU-s; registry blob reads 0.8-1.9 -> 0.4-0.6 CPU-s (their wall is the
registry's). 1 MiB reads gained no more and cost 12-20 MB more peak memory. Over TLS a read gives
little more than one record (16 KiB), so HTTPS gains less: 1 GiB from a local TLS server sharing the
2 cores, 4.3-4.6 s -> 3.9-4.1 s.

Neither library offers this as an option: it is their connection class's `READ_NUM_BYTES`,
raised here only where it exists and is smaller.
"""

from __future__ import annotations

SOCKET_READ = 256 * 1024


def read_larger(connection: type, size: int = SOCKET_READ) -> None:
    """Let an httpcore-style HTTP/1.1 connection class read `size` bytes per recv."""
    current = getattr(connection, "READ_NUM_BYTES", None)
    if isinstance(current, int) and current < size:
        connection.READ_NUM_BYTES = size  # type: ignore[attr-defined]
