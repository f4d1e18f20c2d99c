"""Tar headers and layer streams: deterministic, PAX where needed, readable by tar implementations."""

from __future__ import annotations

import gzip
import hashlib
import io
import itertools
import os
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelcar.errors import InputError
from modelcar.fsutil import stream_file
from modelcar.tarlayer import (
    BLOCK,
    Member,
    SourceChanged,
    TarParams,
    entries,
    file_header,
    iter_layer,
    layer_size,
    member_name,
    read_files,
)

GIB = 1 << 30


def _read_header(header: bytes) -> tarfile.TarInfo:
    # tarfile seeks over the (absent) data of the first member: the header alone is enough.
    with tarfile.open(fileobj=io.BytesIO(header + b"\0" * BLOCK * 2), mode="r:") as tf:
        info = tf.next()
    assert info is not None
    return info


def test_header_fields_are_fixed() -> None:
    info = _read_header(file_header("models/config.json", 663, TarParams()))
    assert (info.name, info.size, info.mode, info.mtime) == ("models/config.json", 663, 0o644, 0)
    assert (info.uid, info.gid, info.uname, info.gname) == (0, 0, "", "")
    assert info.type == tarfile.REGTYPE


def test_header_over_8_gib_uses_pax_size() -> None:
    size = 9 * GIB + 7
    header = file_header("models/model-00001-of-00004.safetensors", size, TarParams())
    assert b"size=" + str(size).encode() in header  # the PAX extended record carries it
    assert len(header) == 3 * BLOCK  # pax header block + pax data block + ustar header
    assert _read_header(header).size == size


def test_long_and_unicode_names_use_pax_path() -> None:
    name = "models/" + "deeply/nested/" * 12 + "model-é.safetensors"
    assert len(name.encode()) > 100
    info = _read_header(file_header(name, 1, TarParams()))
    assert info.name == name


def test_small_plain_header_is_one_ustar_block() -> None:
    assert len(file_header("models/a.json", 10, TarParams())) == BLOCK


def test_source_date_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    assert TarParams.from_env().mtime == 1700000000
    assert _read_header(file_header("models/a", 1, TarParams.from_env())).mtime == 1700000000
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    with pytest.raises(InputError, match="SOURCE_DATE_EPOCH='yesterday' is not an integer") as info:
        TarParams.from_env()  # the user's input, for a library caller too: exit code 2, not a traceback
    assert info.value.exit_code == 2


@pytest.mark.parametrize("bad", ["/etc/passwd", "../x", "a/../../b", "", "a//b", "./a", ".wh.a", "d/.wh..wh..opq"])
def test_unsafe_paths_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        member_name(bad)


def test_names_that_only_look_like_whiteouts_are_files() -> None:
    assert [member_name(p) for p in ("a.wh.b", "x/wh.c", "..wh")] == ["models/a.wh.b", "models/x/wh.c", "models/..wh"]


def _members(files: dict[str, bytes]) -> list[Member]:
    return [Member(p, len(d), hashlib.sha256(d).hexdigest()) for p, d in files.items()]


def _stream(files: dict[str, bytes]) -> bytes:
    ents = entries(_members(files), TarParams())

    def read(m: Member) -> Iterator[bytes]:
        yield files[m.path]

    data = b"".join(iter_layer(ents, read))
    assert len(data) == layer_size(ents)
    return data


def test_files_on_block_boundaries_and_empty_files_keep_the_layer_whole() -> None:
    """A file whose size is a multiple of 512 needs no padding, an empty one neither: one zero block
    too many reads as the archive's end to every tar reader, and the files after it are lost."""
    files = {"a.bin": b"\1" * BLOCK, "b.bin": b"\2" * (3 * BLOCK), "c.json": b"", "d.json": b"{}"}
    data = _stream(files)
    headers = sum(len(e.header) for e in entries(_members(files), TarParams()))
    assert len(data) == headers + BLOCK + 3 * BLOCK + 0 + BLOCK + 2 * BLOCK  # d.json padded to a block; the end
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        assert [m.name for m in tf.getmembers() if m.isfile()] == [f"models/{p}" for p in files]
    assert [(p, size) for p, size, _ in read_files(io.BytesIO(data))] == [(p, len(d)) for p, d in files.items()]


def _tar(add: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in add:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _info(name: str, kind: bytes = tarfile.REGTYPE, size: int = 0, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname = kind, size, link
    return info


def test_read_files_takes_dot_slash_names_and_names_every_entry_that_is_no_file() -> None:
    """Layers made with `tar -C root .` name their members `./models/...` (base images often do);
    a hard link, a device or a FIFO under /models is listed as odd, not only a symlink."""
    layer = _tar(
        [
            (_info("./models/extra.bin", size=3), b"abc"),
            (_info("models/hard", tarfile.LNKTYPE, link="etc/shadow"), None),
            (_info("models/dev", tarfile.CHRTYPE), None),
            (_info("models/fifo", tarfile.FIFOTYPE), None),
            (_info("models/sym", tarfile.SYMTYPE, link="/etc/passwd"), None),
            (_info("./models/sub", tarfile.DIRTYPE), None),
            (_info("etc/other", size=1), b"x"),
        ]
    )
    odd: list[str] = []
    assert [(p, size) for p, size, _ in read_files(io.BytesIO(layer), odd=odd)] == [("extra.bin", 3)]
    assert odd == [
        "hard: a hard link to etc/shadow",
        "dev: a special file",
        "fifo: a special file",
        "sym: a link to /etc/passwd",
    ]


def test_layer_has_parent_dirs_in_order_and_reads_back() -> None:
    files = {"tok/vocab.txt": b"a b c", "config.json": b"{}", "tok/merges.txt": b"x" * 1000}
    data = _stream(files)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        infos = tf.getmembers()
        assert [(i.name, i.type) for i in infos] == [
            ("models", tarfile.DIRTYPE),
            ("models/config.json", tarfile.REGTYPE),
            ("models/tok", tarfile.DIRTYPE),
            ("models/tok/merges.txt", tarfile.REGTYPE),
            ("models/tok/vocab.txt", tarfile.REGTYPE),
        ]
        assert [i.mode for i in infos] == [0o755, 0o644, 0o755, 0o644, 0o644]
        for path, content in files.items():
            f = tf.extractfile(f"models/{path}")
            assert f is not None and f.read() == content
    assert data.endswith(b"\0" * 1024)
    assert len(data) % BLOCK == 0


def test_gnu_tar_reads_the_layer(tmp_path: Path) -> None:
    files = {"a/b/" + "long-name-" * 12 + ".json": b"{}", "w.safetensors": b"\1" * 3000}
    (tmp_path / "layer.tar").write_bytes(_stream(files))
    listing = subprocess.run(["tar", "-tvf", str(tmp_path / "layer.tar")], capture_output=True, text=True, check=True)
    assert "models/a/b/" + "long-name-" * 12 + ".json" in listing.stdout
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["tar", "-xf", str(tmp_path / "layer.tar"), "-C", str(out)], check=True)
    assert (out / "models" / "w.safetensors").read_bytes() == b"\1" * 3000


def test_layer_is_deterministic() -> None:
    files = {"config.json": b"{}", "model.safetensors": os.urandom(5000)}
    assert _stream(files) == _stream(dict(reversed(list(files.items()))))


def test_changed_source_size_is_detected() -> None:
    ents = entries([Member("a.bin", 10, "0" * 64)], TarParams())
    with pytest.raises(SourceChanged, match="expected 10 bytes"):
        b"".join(iter_layer(ents, lambda m: iter([b"short"])))
    with pytest.raises(SourceChanged, match="more"):
        b"".join(iter_layer(ents, lambda m: iter([b"x" * 11])))


def test_sparse_file_over_8_gib_streams_through_the_header(tmp_path: Path) -> None:
    """A real > 8 GiB file (sparse, so no disk is used): header and size are right; we read only the start."""
    big = tmp_path / "big.safetensors"
    size = 8 * GIB + 512 + 3
    with big.open("wb") as f:
        f.truncate(size)
    assert big.stat().st_size == size
    ents = entries([Member("big.safetensors", size, "0" * 64)], TarParams())
    total = layer_size(ents)
    assert total == sum(len(e.header) for e in ents) + size + (-size % BLOCK) + 1024

    def read(m: Member) -> Iterator[bytes]:
        with big.open("rb") as fh:
            yield fh.read(1 << 20)

    stream = iter_layer(ents, read)
    head = next(stream) + next(stream)  # the dir header, then the file's PAX + ustar header
    with tarfile.open(fileobj=io.BytesIO(head + b"\0" * 2048), mode="r:") as tf:
        first, second = tf.next(), tf.next()
    assert first is not None and first.name == "models" and first.isdir()
    assert second is not None and (second.name, second.size) == ("models/big.safetensors", size)


def test_stream_file_reads_large_into_one_buffer_and_hands_out_small_views(tmp_path: Path) -> None:
    data = os.urandom(5 * 1024 + 17)
    path = tmp_path / "weights"
    path.write_bytes(data)
    seen: list[bytes] = []
    buffers = set()
    for view in stream_file(path, chunk=2048, piece=1000):
        assert len(view) <= 1000
        buffers.add(id(view.obj))  # every view is of the same reused buffer: no allocation per read
        seen.append(view.tobytes())
    assert b"".join(seen) == data and len(buffers) == 1
    # pieces never straddle a read: 2048 = 1000 + 1000 + 48
    assert [len(s) for s in seen[:3]] == [1000, 1000, 48]


def test_write_behind_hands_each_written_step_to_the_kernel_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from modelcar import fsutil

    ranges: list[tuple[int, int]] = []
    real = os.posix_fadvise

    def spy(fd: int, offset: int, length: int, advice: int) -> None:
        assert advice == os.POSIX_FADV_DONTNEED
        ranges.append((offset, length))
        real(fd, offset, length, advice)

    monkeypatch.setattr(fsutil, "WRITEBACK_STEP", 4096)
    monkeypatch.setattr(os, "posix_fadvise", spy)
    pieces = [os.urandom(n) for n in (100, 5000, 3000, 1 << 16, 7)]
    path = tmp_path / "blob"
    with fsutil.WriteBehind(path) as out:
        for piece in pieces:
            assert out.write(memoryview(piece)) == len(piece)
        out.sync()
    assert path.read_bytes() == b"".join(pieces)
    # contiguous from the start, each at least one step, none past what was written
    assert ranges and ranges[0][0] == 0
    assert all(a + n == b for (a, n), (b, _) in itertools.pairwise(ranges))
    assert all(n >= 4096 for _, n in ranges)
    assert sum(n for _, n in ranges) <= path.stat().st_size


def test_a_chunk_reader_feeds_tarfile_chunks_of_any_size(tmp_path: Path) -> None:
    """A blob streamed from a registry comes in pieces of whatever size the socket gave; tarfile
    (the archive store) takes any short read for the end of the data."""
    from modelcar.fsutil import ChunkReader

    pieces = [os.urandom(n) for n in (1, 7000, 65537, 3, 100_000, 16384, 5)]
    data = b"".join(pieces)
    reader = ChunkReader(iter(pieces))
    with tarfile.open(tmp_path / "a.tar", "w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("blobs/sha256/x")
        info.size = len(data)
        tf.addfile(info, reader)
    assert reader.count == len(data) and reader.digest == "sha256:" + hashlib.sha256(data).hexdigest()
    with tarfile.open(tmp_path / "a.tar") as tf:
        member = tf.extractfile("blobs/sha256/x")
        assert member is not None and member.read() == data


def test_a_gzip_layer_is_read_to_its_last_member() -> None:
    """eStargz (and bgzip) layers are gzip members one after another; tarfile's `r|gz` stops at
    the end of the first, so verify missed every file after it."""

    def member(name: str, data: bytes, *, end: bool) -> bytes:
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tf:
            info = tarfile.TarInfo(f"models/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        raw = out.getvalue()
        return gzip.compress(raw if end else raw[: BLOCK + len(data) + (-len(data)) % BLOCK], mtime=0)

    layer = member("a.json", b"{}", end=False) + member("b.bin", b"x" * 1000, end=True)
    got = [(path, size, f.read()) for path, size, f in read_files(io.BytesIO(layer), gzip=True)]
    assert got == [("a.json", 2, b"{}"), ("b.bin", 1000, b"x" * 1000)]


@pytest.mark.parametrize("kind", ["pax", "gnu"])
def test_an_oversized_extended_header_is_refused_before_it_is_read(kind: str) -> None:
    """tarfile reads an extended header whole, before any digest is checked: a small gzip layer
    whose first header claims gigabytes took verify to 9 GB of memory."""
    out = io.BytesIO()
    name = "models/" + "n" * (2 << 20)  # a 2 MiB name: a PAX record, or a GNU long-name header
    fmt = tarfile.PAX_FORMAT if kind == "pax" else tarfile.GNU_FORMAT
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tf:
        info = tarfile.TarInfo(name)
        info.size = 2
        tf.addfile(info, io.BytesIO(b"{}"))
    layer = gzip.compress(out.getvalue(), mtime=0)
    with pytest.raises(tarfile.HeaderError, match=r"an extended header of \d+ bytes"):
        list(read_files(io.BytesIO(layer), gzip=True))
