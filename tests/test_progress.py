"""Progress bars on a terminal do not garble the log lines written while they are drawn."""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path

import pytest

from modelcar.copy import copy_blobs
from modelcar.image import MEDIA_LAYER, Descriptor
from modelcar.progress import Progress
from modelcar.stores.layout import LayoutStore


def test_a_library_caller_s_own_logging_gets_each_line_once(capsys: pytest.CaptureFixture[str]) -> None:
    """A script that set up the root logger: modelcar's lines go through it once, not a second
    time through the bars' redirect."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("ROOT %(name)s: %(message)s"))
    root, log = logging.getLogger(), logging.getLogger("modelcar")
    old = log.handlers[:], log.propagate
    log.handlers[:], log.propagate = [logging.NullHandler()], True  # as a library leaves it (no CLI run before)
    root.addHandler(handler)
    try:
        with Progress(enabled=True).bar("build", 10, "build"):
            log.warning("inside a bar")
    finally:
        root.removeHandler(handler)
        log.handlers[:], log.propagate = old
    assert out.getvalue() == "ROOT modelcar: inside a bar\n"
    assert "inside a bar" not in capsys.readouterr().err


def test_log_lines_go_above_the_bars(capsys: pytest.CaptureFixture[str]) -> None:
    log = logging.getLogger("modelcar")
    handler = logging.StreamHandler()  # sys.stderr as the CLI sets it up (here: pytest's capture)
    handler.setFormatter(logging.Formatter("modelcar: %(message)s"))
    old = log.handlers[:], log.propagate, log.level
    log.handlers[:], log.propagate = [handler], False
    log.setLevel(logging.INFO)
    try:
        progress = Progress(enabled=True)
        with progress.bar("download", 100, "download"), progress.bar("build", 100, "build"):
            progress.advance("build", 40)
            log.info("m: sha256:1234: 1 layers")
            progress.advance("build", 60)
        log.info("after the bars")
    finally:
        log.handlers[:], log.propagate, _ = old
        log.setLevel(old[2])
    err = capsys.readouterr().err
    # what is left on each line once the terminal has run the carriage returns and cursor moves
    lines = [re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", line.rsplit("\r", 1)[-1]) for line in err.split("\n")]
    assert "modelcar: m: sha256:1234: 1 layers" in lines  # a line of its own, not after a bar's text
    assert "modelcar: after the bars" in lines
    assert any("build" in line and "100/100" in line for line in err.split("\n"))


def test_copies_draw_a_bar(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, dst = LayoutStore(tmp_path / "a"), LayoutStore(tmp_path / "b")
    digest = src.put_blob("m", 2048, lambda: [b"x" * 2048])
    copy_blobs(src, "m", dst, "m", [Descriptor(MEDIA_LAYER, digest, 2048)], progress=Progress(enabled=True))
    assert dst.has_blob("m", digest)
    assert "copy m: 100%" in capsys.readouterr().err


def test_nothing_to_count_draws_no_bar(capsys: pytest.CaptureFixture[str]) -> None:
    """A no-op build downloads nothing: an empty `download: 0.00B` bar was drawn, and garbled the
    build bar beside it."""
    progress = Progress(enabled=True)
    with progress.bar("download", 0, "download"), progress.bar("build", 10, "build"):
        progress.advance("download", 0)
        progress.advance("build", 10)
    err = capsys.readouterr().err
    assert "download" not in err and "10.0/10.0" in err


def test_bars_drawn_in_two_threads_leave_the_host_s_logging_as_it_was() -> None:
    """Two library builds with bars, in threads of one service: each bar's start and end
    interleaved with the other's; the loggers' handlers are put back as they were."""
    import threading

    log = logging.getLogger("modelcar")
    handler = logging.StreamHandler()  # on sys.stderr: a handler the bars redirect
    old = log.handlers[:]
    log.handlers[:] = [handler]
    a_open, b_open, a_closed = threading.Event(), threading.Event(), threading.Event()

    def a() -> None:
        with Progress(enabled=True).bar("build", 10, "a"):
            a_open.set()
            b_open.wait(10)
        a_closed.set()

    def b() -> None:
        a_open.wait(10)
        with Progress(enabled=True).bar("build", 10, "b"):
            b_open.set()
            a_closed.wait(10)

    try:
        threads = [threading.Thread(target=a), threading.Thread(target=b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert a_closed.is_set() and b_open.is_set()  # the two bars were drawn at once
        assert log.handlers == [handler]
    finally:
        log.handlers[:] = old


def _built(tmp_path: Path, weights: int) -> Path:
    """The catalog of a `path:` model `tiny` with a weight file of `weights` bytes, built into its layout."""
    from modelcar import api
    from tests.conftest import write_catalog

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"w" * weights)
    cat = write_catalog(tmp_path / "catalog.yaml", "models:\n  - name: tiny\n    path: ./m\n")
    api.build(cat)
    return cat


def _last_verify_bar(err: str) -> str:
    bars = [line for line in err.replace("\r", "\n").splitlines() if "verify tiny" in line]
    assert bars, err
    return bars[-1]


def test_verify_draws_a_bar_per_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """verify reads every byte of every image (minutes for a 100 GB model) and drew nothing."""
    from modelcar import api

    cat = _built(tmp_path, 1 << 20)
    capsys.readouterr()
    report = api.verify(cat, progress=Progress(enabled=True))
    assert report["tiny"].problems == []
    assert "100%" in _last_verify_bar(capsys.readouterr().err)


def test_a_layer_verify_reads_again_is_counted_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read that dropped midway and was retried counted its bytes twice: the bar ended past its
    total (48 MB of 32), on the long runs a bar is for."""
    from typing import Any

    from modelcar import api, verify

    cat = _built(tmp_path, 17 << 20)
    capsys.readouterr()
    read_blob, dropped = verify.read_blob, []

    def drops_once(store: Any, repo: str, desc: Any) -> Any:
        chunks = read_blob(store, repo, desc)
        if desc.size < (17 << 20) or dropped:
            return chunks
        dropped.append(desc.digest)

        def cut() -> Any:
            sent = 0
            for chunk in chunks:
                yield chunk
                sent += len(chunk)
                if sent >= 8 << 20:
                    raise ConnectionResetError(104, "Connection reset by peer")

        return cut()

    monkeypatch.setattr(verify, "read_blob", drops_once)
    report = api.verify(cat, progress=Progress(enabled=True))
    assert dropped and report["tiny"].problems == []
    assert "100%" in _last_verify_bar(capsys.readouterr().err)


def test_a_blob_copied_again_is_counted_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mirror whose source dropped midway copied the blob again and counted its bytes twice."""
    from typing import Any

    from modelcar import copy
    from modelcar.retry import RetryPolicy

    src, dst = LayoutStore(tmp_path / "a"), LayoutStore(tmp_path / "b")
    data = b"x" * (3 << 20)
    digest = src.put_blob("m", len(data), lambda: [data])
    read_blob, dropped = copy.read_blob, []

    def drops_once(store: Any, repo: str, desc: Any) -> Any:
        chunks = read_blob(store, repo, desc)
        if dropped:
            return chunks
        dropped.append(desc.digest)

        def cut() -> Any:
            yield next(iter(chunks))  # the first piece, then the connection is gone
            raise ConnectionResetError(104, "Connection reset by peer")

        return cut()

    monkeypatch.setattr(copy, "read_blob", drops_once)
    blobs = [Descriptor(MEDIA_LAYER, digest, len(data))]
    progress = Progress(enabled=True)
    copy_blobs(src, "m", dst, "m", blobs, progress=progress, retry=RetryPolicy(base_delay=0.01))
    assert dropped and dst.has_blob("m", digest)
    err = capsys.readouterr().err.replace("\r", "\n")
    bars = [line for line in err.splitlines() if "copy m" in line]
    assert bars and "100%" in bars[-1] and "3.00M/3.00M" in bars[-1], bars[-1]
