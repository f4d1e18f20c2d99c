"""Fixtures: a fake Hub on loopback, isolated HF caches, catalogs, and the system tools we test with.

huggingface_hub reads HF_ENDPOINT and HF_HUB_DISABLE_XET when it is imported, so the fake Hub's
port is chosen and the environment set here, before any test module imports it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_HUB_PORT = _free_port()
os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{_HUB_PORT}"
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ.pop("HF_TOKEN", None)
os.environ.pop("SOURCE_DATE_EPOCH", None)

from typer.testing import CliRunner  # noqa: E402

from modelcar.cli import app  # noqa: E402
from tests.fakehub import FakeHub  # noqa: E402

pytest_plugins = ["tests.registry"]


@pytest.fixture(autouse=True)
def _isolated_layer_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with an empty layer-digest cache, never the user's."""
    monkeypatch.setenv("MODELCAR_CACHE", str(tmp_path / "modelcar-cache"))


@pytest.fixture(scope="session")
def _hub_server() -> Iterator[FakeHub]:
    hub = FakeHub(port=_HUB_PORT).start()
    yield hub
    hub.stop()


@pytest.fixture
def fake_hub(_hub_server: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    """The fake Hub, emptied, with an empty HF cache for this test."""
    _hub_server.reset()
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    return _hub_server


def missing(message: str) -> NoReturn:
    """What a test needs is not here: it fails under CI (a run that tested less is no pass) and
    skips elsewhere."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def require_tool(name: str) -> str:
    """Path of a system tool; a test that needs a missing one fails under CI and skips elsewhere."""
    path = shutil.which(name)
    if path is None:
        missing(f"{name} is not installed (scripts/test.sh installs it when run as root)")
    return path


class Cli:
    """Runs `modelcar` in-process, as a user would type it."""

    def __init__(self) -> None:
        self.runner = CliRunner()

    def __call__(self, *args: str | Path, code: int | None = 0) -> Any:
        result = self.runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
        if code is not None:
            assert result.exit_code == code, (
                f"exit {result.exit_code} != {code}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
            )
        return result


@pytest.fixture
def user_xattrs(tmp_path: Path) -> None:
    """tmp_path's file system keeps user extended attributes (checked.py's stamps): tmpfs before
    Linux 6.6 and some network file systems do not (modelcar then checks every read), and the
    tests of the stamps cannot run there."""
    probe = tmp_path / ".xattr-probe"
    probe.write_bytes(b"")
    try:
        os.setxattr(probe, "user.modelcar.probe", b"1")
    except (OSError, AttributeError) as exc:  # AttributeError: no xattr calls on this platform
        missing(f"no user xattrs on {tmp_path}'s file system ({exc}): set TMPDIR to a directory on one that has")
    finally:
        probe.unlink()


@pytest.fixture
def cli() -> Cli:
    return Cli()


def run_module(
    *args: str | Path, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m modelcar ...` in a subprocess: the real entry point, real exit codes."""
    return subprocess.run(
        [sys.executable, "-m", "modelcar", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        timeout=300,
    )


def write_catalog(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
