"""Socket reads for bulk downloads: raised where the HTTP stacks have the knob, never lowered."""

from __future__ import annotations

import httpcore
import pytest

from modelcar.hub import Hub
from modelcar.sockets import SOCKET_READ, read_larger
from modelcar.stores.registry_client import RegistryClient, RegistryOptions


def test_read_larger_raises_only_a_smaller_read() -> None:
    class Small:
        READ_NUM_BYTES = 64 * 1024

    class Large:
        READ_NUM_BYTES = 4 << 20

    class Other:
        pass

    for cls in (Small, Large, Other):
        read_larger(cls)
    assert Small.READ_NUM_BYTES == SOCKET_READ
    assert Large.READ_NUM_BYTES == 4 << 20
    assert not hasattr(Other, "READ_NUM_BYTES")


def test_the_hub_and_registry_clients_read_in_larger_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub 2.x downloads with httpcore2, 1.x with httpcore (loaded here by the test
    itself): Hub() raises whichever is loaded; the registry client raises httpcore, its own."""
    httpcore2 = pytest.importorskip("httpcore2")  # huggingface_hub 1.x has none
    for connection in (httpcore.HTTP11Connection, httpcore2.HTTP11Connection):
        monkeypatch.setattr(connection, "READ_NUM_BYTES", 64 * 1024)
    Hub()
    assert httpcore2.HTTP11Connection.READ_NUM_BYTES == SOCKET_READ
    assert httpcore.HTTP11Connection.READ_NUM_BYTES == SOCKET_READ
    monkeypatch.setattr(httpcore.HTTP11Connection, "READ_NUM_BYTES", 64 * 1024)
    RegistryClient("127.0.0.1:5000", RegistryOptions.create())
    assert httpcore.HTTP11Connection.READ_NUM_BYTES == SOCKET_READ
