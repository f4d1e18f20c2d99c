"""Hub client behaviour: tokens, cache location, bounded concurrency, retry timing rules."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import random
import re
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest

from modelcar.errors import HubError, without_credentials
from modelcar.hub import hf_cache_dir
from modelcar.retry import RetryGiveUp, RetryPolicy, backoff_delay, call_with_retry, server_delay
from tests.conftest import Cli, write_catalog
from tests.fakehub import FakeHub

FILES = {f"model-{i:05d}-of-00006.safetensors": bytes([i]) * 2048 for i in range(6)} | {"config.json": b"{}"}
CATALOG = "models:\n  - name: tiny\n    hf: org/tiny\n"


def test_hf_token_is_sent_and_never_printed(
    cli: Cli, fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "hf_" + "s3cr3t" * 5
    fake_hub.add_repo("org/tiny", FILES)
    fake_hub.tokens["org/tiny"] = secret
    cat = write_catalog(tmp_path / "catalog.yaml", CATALOG)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "no-saved-token"))
    result = cli("build", "-c", cat, code=2)
    assert "repository not found" in result.stderr and "set HF_TOKEN" in result.stderr

    monkeypatch.setenv("HF_TOKEN", "hf_wrong_" + secret)
    result = cli("build", "-c", cat, "-v", code=2)
    assert secret not in result.stdout + result.stderr
    assert "or the token in use (HF_TOKEN or the saved login) cannot read it" in result.stderr  # not "set HF_TOKEN"

    monkeypatch.setenv("HF_TOKEN", secret)
    result = cli("build", "-c", cat, "-v", "--json")
    assert f"Bearer {secret}" in fake_hub.auth_headers
    assert secret not in result.stdout + result.stderr
    assert secret not in (tmp_path / "catalog.lock").read_text()


def test_partial_downloads_of_killed_runs_are_removed_and_live_ones_kept(
    cli: Cli, fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """huggingface_hub leaves `<etag>.<8 hex>.incomplete` when its process is killed, never resumed:
    gigabytes per weight file per kill. One whose etag lock (huggingface_hub's, held while it
    downloads) nobody holds goes, also in a build that downloads nothing; others stay."""
    cache = tmp_path / "hf"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    fake_hub.add_repo("org/tiny", FILES)
    cat = write_catalog(tmp_path / "catalog.yaml", CATALOG)
    cli("build", "-c", cat)
    blobs, locks = cache / "models--org--tiny" / "blobs", cache / ".locks" / "models--org--tiny"
    old = time.time() - 3600
    partial = {}
    for name in ("orphan", "held", "fresh", "nolock", "resumable", "fifo"):
        etag = hashlib.sha256(name.encode()).hexdigest()
        partial[name] = blobs / (f"{etag}.incomplete" if name == "resumable" else f"{etag}.0123abcd.incomplete")
        partial[name].write_bytes(b"x" * 1000)
        if name != "fresh":
            os.utime(partial[name], (old, old))
        if name == "fifo":
            os.mkfifo(locks / f"{etag}.lock")  # planted in a shared cache: opening it must not hang the run
        elif name != "nolock":
            (locks / f"{etag}.lock").touch()
    with (locks / f"{partial['held'].name.split('.')[0]}.lock").open() as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # a download of that etag in flight, in another process
        assert "(0 written, " in cli("build", "-c", cat).stderr
    assert sorted(n for n, p in partial.items() if p.exists()) == ["fifo", "fresh", "held", "nolock", "resumable"]
    partial["fresh"].rename(partial["orphan"])
    os.utime(partial["orphan"], (old, old))
    cli("build", "-c", cat, "--dry-run")  # a dry run changes nothing
    assert partial["orphan"].exists()
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", "~nosuchuser-modelcar/hf")  # no home directory: no cache to sweep
    assert "(0 written, " in cli("build", "-c", cat).stderr  # and a build with nothing to download goes on


def test_credentials_in_the_hub_endpoint_are_never_printed(
    cli: Cli, fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An HF_ENDPOINT of a mirror behind a proxy may carry user:password; the errors quoted it."""
    host = fake_hub.url.split("://", 1)[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://proxyuser:hunter2pw@{host}")
    cat = write_catalog(tmp_path / "catalog.yaml", "models:\n  - name: tiny\n    hf: org/nope\n")
    result = cli("lock", "-c", cat, "-v", "--json", code=2)
    assert f"repository not found on http://{host} " in result.stderr
    assert "hunter2pw" not in result.stdout + result.stderr and "proxyuser" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("url", "secrets", "kept"),
    [
        (  # S3 presigned, as the Hub's CDN (cas-bridge) hands out
            "https://cas-bridge.xethub.hf.co/x?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAX%2F20261129"
            "&X-Amz-Date=20261129T120000Z&X-Amz-Expires=3600&X-Amz-Signature=f00dfeed&X-Amz-SignedHeaders=host",
            ["AKIAX", "f00dfeed"],
            ["https://cas-bridge.xethub.hf.co/x?", "X-Amz-Expires=3600", "X-Amz-SignedHeaders=host"],
        ),
        (  # CloudFront signed (cdn-lfs)
            "https://cdn-lfs.hf.co/repos/a/b/c?response-content-disposition=inline&Expires=1800000000"
            "&Policy=eyJTdGF0ZW1lbnQi&Signature=Zk9~a-b_c&Key-Pair-Id=K3ESJI6DHPFC7",
            ["eyJTdGF0ZW1lbnQi", "Zk9~a-b_c", "K3ESJI6DHPFC7"],
            ["https://cdn-lfs.hf.co/repos/a/b/c?", "Expires=1800000000"],
        ),
        (  # Azure SAS
            "https://acct.blob.core.windows.net/c/b?sv=2021-08-06&se=2026-11-29&sp=r&sig=AbC%2Bd%3D",
            ["AbC%2Bd%3D"],
            ["sp=r"],
        ),
        (
            "https://storage.googleapis.com/b/o?X-Goog-Credential=svc%40p&X-Goog-Signature=deadbeef",
            ["svc%40p", "deadbeef"],
            ["https://storage.googleapis.com/b/o?"],
        ),
        (
            "http://proxyuser:hunter2pw@mirror.internal/api?token=hf_abcdef",
            ["proxyuser", "hunter2pw", "hf_abcdef"],
            ["http://mirror.internal/api?token="],
        ),
        ("http://user:pa@ss@proxy.internal/x", ["user", "pa@ss"], ["http://proxy.internal/x"]),  # @ in a password
        (  # quoted in JSON, in HTML, percent-encoded inside another URL
            "https://cdn/x?a=1\\u0026X-Amz-Signature=S1&amp;sig=S2&u=https%3A%2F%2Fy%3FX-Amz-Signature%3DS3%26z%3D1",
            ["S1", "S2", "S3"],
            ["https://cdn/x?a=1", "%26z%3D1"],
        ),
        (
            "https://h/p;sig=S4;x=1#hf_token=S5&api_key=S6&hdnts=S7&q-signature=S8",
            ["S4", "S5", "S6", "S7", "S8"],
            [";x=1"],
        ),
        (  # the security tokens of Tencent's, Huawei's and Alibaba's presigned URLs; OAuth and GitLab names
            "https://b.cos.example/o?q-sign-algorithm=sha1&x-cos-security-token=T1&x-obs-security-token=T2"
            "&security-token=T3&OSSAccessKeyId=T4&client_secret=T5&private_token=T6&x-api-key=T7&__token__=T8",
            ["T1", "T2", "T3", "T4", "T5", "T6", "T7", "T8"],
            ["q-sign-algorithm=sha1&x-cos-security-token="],
        ),
        (  # user:password in a URL quoted in JSON, and percent-encoded inside another URL
            'log {"url": "https:\\/\\/proxyuser:hunter2pw@mirror.internal\\/api"} '
            "next=https%3A%2F%2Fu2%3Apw2%40mirror.internal%2Fx",
            ["proxyuser", "hunter2pw", "u2%3A", "pw2"],
            ['"https:\\/\\/mirror.internal\\/api"', "next=https%3A%2F%2Fmirror.internal%2Fx"],
        ),
        ("https://mirror.internal?next=a@b.example", [], ["https://mirror.internal?next=a@b.example"]),  # no path
        (  # a `#` or `?` in a password, as pasted into HTTPS_PROXY
            "https://user:pa#ss@proxy.internal:3128 https://user2:pa?ss@proxy.internal:3128/x",
            ["pa#ss", "pa?ss", "user"],
            ["https://proxy.internal:3128 https://proxy.internal:3128/x"],
        ),
        (  # percent-encoded right after an encoded `=`
            "https://h/a?q=x%3Dhttps%3A%2F%2Fuser%3Apw%40host%2Fx",
            ["user%3A", "pw%40"],
            ["q=x%3Dhttps%3A%2F%2Fhost%2Fx"],
        ),
        ("oci://registry.example/models/tiny@sha256:" + "a" * 64, [], ["tiny@sha256:" + "a" * 64]),  # not userinfo
        ("https://maps.example/api?key=AIzaS9&n=100&last=x", ["AIzaS9"], ["n=100&last=x"]),  # an API key, listing kept
    ],
)
def test_signed_urls_lose_their_signature_in_what_is_printed(url: str, secrets: list[str], kept: list[str]) -> None:
    line = without_credentials(f"GET {url} (authenticated: False)")
    assert not any(s in line for s in secrets), line
    assert all(k in line for k in kept) and line.endswith(" (authenticated: False)")


def test_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hf_cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", str(tmp_path / "legacy"))  # huggingface_hub still reads it
    assert hf_cache_dir() == tmp_path / "legacy"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert hf_cache_dir() == tmp_path / "cache"
    monkeypatch.setenv("DATA", str(tmp_path / "data"))
    monkeypatch.setenv("HF_HUB_CACHE", "$DATA/hf")
    assert hf_cache_dir() == tmp_path / "data" / "hf"


def test_build_downloads_into_hf_home(
    cli: Cli, fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    fake_hub.add_repo("org/tiny", FILES)
    cli("build", "-c", write_catalog(tmp_path / "catalog.yaml", CATALOG))
    snapshots = list((tmp_path / "home" / "hub" / "models--org--tiny" / "snapshots").iterdir())
    assert len(snapshots) == 1 and len(list(snapshots[0].iterdir())) == len(FILES)


@pytest.mark.parametrize("workers", [1, 3])
def test_hf_workers_bounds_concurrent_downloads(cli: Cli, fake_hub: FakeHub, tmp_path: Path, workers: int) -> None:
    fake_hub.add_repo("org/tiny", FILES)
    cat = write_catalog(tmp_path / "catalog.yaml", CATALOG)
    cli("lock", "-c", cat)
    fake_hub.max_inflight = 0
    fake_hub.file_delay = 0.2  # each in flight a while: more at once than allowed would overlap
    fake_hub.hold_until = dict.fromkeys(FILES, lambda: fake_hub.max_inflight >= workers)  # until that many at once
    cli("build", "-c", cat, "--hf-workers", str(workers))
    assert fake_hub.max_inflight == workers  # never exceeded
    assert set(fake_hub.held.values()) == {True}  # and reached


# --- retry rules ------------------------------------------------------------------------------


def test_a_name_that_does_not_resolve_is_not_retried() -> None:
    """A typo'd registry or HF_ENDPOINT fails at once, not after 8 retries and minutes of waits;
    a resolver that did not answer in time (EAI_AGAIN) is retried."""
    import socket

    import httpx

    from modelcar.retry import is_retryable

    def connect_error(errno: int) -> httpx.ConnectError:
        try:
            try:
                raise socket.gaierror(errno, "resolver")
            except socket.gaierror as cause:
                raise httpx.ConnectError(str(cause)) from cause
        except httpx.ConnectError as exc:
            return exc

    assert not is_retryable(connect_error(socket.EAI_NONAME))
    assert is_retryable(connect_error(socket.EAI_AGAIN))
    assert is_retryable(httpx.ConnectError("[Errno 111] Connection refused"))


def test_retry_after_seconds_and_http_date() -> None:
    assert server_delay({"Retry-After": "7"}) == 7.0
    now = datetime(2026, 1, 1, tzinfo=UTC)
    when = format_datetime(now + timedelta(seconds=30), usegmt=True)
    assert server_delay({"retry-after": when}, now=now.timestamp()) == pytest.approx(30.0)
    assert (
        server_delay({"Retry-After": format_datetime(now - timedelta(seconds=5), usegmt=True)}, now=now.timestamp())
        == 0
    )


def test_ratelimit_headers() -> None:
    assert server_delay({"RateLimit": '"api";r=0;t=42'}) == 42.0
    assert server_delay({"RateLimit": '"api";r=5;t=42'}) is None  # requests left: no need to wait
    assert server_delay({"RateLimit-Reset": "9"}) == 9.0
    assert server_delay({}) is None
    # several policies: the one with nothing left decides
    assert server_delay({"RateLimit": '"api";r=10;t=300, "resolvers";r=0;t=30'}) == 30.0
    assert server_delay({"RateLimit": '"api";r=0;t=300, "resolvers";r=0;t=30'}) == 300.0
    assert server_delay({"Retry-After": "1.5"}) == 1.5
    assert server_delay({"RateLimit": '"api";t=42'}) == 42.0  # no `r`: only the reset is said, so wait


def test_the_retry_deadline_counts_from_the_first_failure_not_the_first_call() -> None:
    now = [0.0]
    attempts = iter([ConnectionResetError("after an hour of transfer"), "ok"])

    def long_transfer() -> str:
        now[0] += 3600.0  # each attempt runs an hour before it ends
        item = next(attempts)
        if isinstance(item, BaseException):
            raise item
        return item

    policy = RetryPolicy(deadline=900.0)
    assert call_with_retry(long_transfer, "x", policy, sleep=lambda s: None, clock=lambda: now[0]) == "ok"


def test_backoff_is_jittered_exponential_and_capped() -> None:
    policy = RetryPolicy(base_delay=1.0, max_delay=10.0)
    rng = random.Random(1)
    for attempt, ceiling in [(0, 1.0), (1, 2.0), (3, 8.0), (4, 10.0), (20, 10.0)]:
        samples = [backoff_delay(attempt, policy, rng) for _ in range(200)]
        assert all(0.0 <= s <= ceiling for s in samples)
        assert max(samples) > ceiling * 0.8 and min(samples) < ceiling * 0.2  # full jitter spreads out


class _Status(Exception):
    def __init__(self, status: int, headers: dict[str, str] | None = None) -> None:
        super().__init__(f"HTTP {status}")

        class Response:
            status_code = status

        Response.headers = headers or {}  # type: ignore[attr-defined]
        self.response = Response()


def test_call_with_retry_stops_at_the_cap_and_passes_other_errors() -> None:
    calls: list[int] = []
    slept: list[float] = []

    def failing() -> None:
        calls.append(1)
        raise _Status(503, {"Retry-After": "2"})

    with pytest.raises(RetryGiveUp, match="still failing after 4 attempts"):
        call_with_retry(failing, "x", RetryPolicy(max_retries=3), sleep=slept.append)
    assert len(calls) == 4 and slept == [2.0, 2.0, 2.0]

    def not_found() -> None:
        raise _Status(404)

    with pytest.raises(_Status):
        call_with_retry(not_found, "x", RetryPolicy(), sleep=slept.append)

    attempts = iter([ConnectionResetError("peer"), _Status(429, {"RateLimit": '"api";r=0;t=3'}), "ok"])

    def flaky() -> str:
        item = next(attempts)
        if isinstance(item, BaseException):
            raise item
        return item

    slept.clear()
    assert call_with_retry(flaky, "x", RetryPolicy(base_delay=0.01), sleep=slept.append) == "ok"
    assert len(slept) == 2 and slept[1] == 3.0


@pytest.mark.parametrize("status", sorted({408, 429, 500, 502, 503, 504}))
def test_every_status_a_server_says_try_again_with_is_retried(status: int) -> None:
    """A timeout (408), a rate limit (429), and a proxy or server that is down for now (500, 502,
    503, 504): retried; a CDN in front of the Hub answers 502/504 more than anything else."""
    attempts = iter([_Status(status), "ok"])

    def once() -> str:
        item = next(attempts)
        if isinstance(item, BaseException):
            raise item
        return item

    slept: list[float] = []
    assert call_with_retry(once, "x", RetryPolicy(base_delay=0.01), sleep=slept.append) == "ok"
    assert len(slept) == 1


def test_hub_workers_bound_the_lock_s_requests_across_entries(cli: Cli, fake_hub: FakeHub, tmp_path: Path) -> None:
    """Entries are locked together, but --hf-workers bounds the requests in flight across all of
    them: the Hub sees no more than that from one run (what earns a 429 is a burst)."""
    entries = ""
    for i in range(6):
        fake_hub.add_repo(f"org/m{i}", {f"{n}.json": f'{{"m": {i}, "f": "{n}"}}'.encode() for n in ("a", "b", "c")})
        entries += f"  - name: m{i}\n    hf: org/m{i}\n"
    cat = write_catalog(tmp_path / "catalog.yaml", "models:\n" + entries)
    fake_hub.file_delay = 0.2  # each in flight a while: more at once than allowed would overlap
    fake_hub.hold_until = dict.fromkeys(("a.json", "b.json", "c.json"), lambda: fake_hub.max_inflight >= 2)
    cli("lock", "-c", cat, "--hf-workers", "2")
    assert fake_hub.count("GET", ".json") == 18 and fake_hub.max_inflight == 2  # never exceeded
    assert set(fake_hub.held.values()) == {True}  # and reached


def test_a_failed_answer_is_asked_again(fake_hub: FakeHub) -> None:
    """The Hub asks each question once per run, but keeps no failure: a library caller retrying
    after an outage gets the answer, not the old error."""
    from modelcar.hub import Hub

    commit = fake_hub.add_repo("org/tiny", {"config.json": b"{}"})
    hub = Hub(RetryPolicy(max_retries=0))
    fake_hub.inject("revision", status=503, times=1)
    with pytest.raises(HubError, match="HTTP 503"):
        hub.resolve("org/tiny", "main")
    assert hub.resolve("org/tiny", "main") == commit


def test_a_listing_whose_connection_fails_is_one_attempt_of_modelcars(tmp_path: Path) -> None:
    """huggingface_hub's `list_repo_tree` retries a failed connection itself, five times over 23 s
    of sleeps, inside each of modelcar's attempts: `--max-retries 0 --retry-deadline 1` took 23 s,
    and a Hub shedding load got six requests for each of modelcar's. Here each connection the
    listing makes is one attempt of modelcar's."""
    import socket
    import struct
    import threading

    from modelcar.hub import Hub

    accepted: list[int] = []
    with socket.create_server(("127.0.0.1", 0)) as server:

        def reset_each() -> None:  # a load balancer shedding load: each connection reset at once
            while True:
                try:
                    conn, _ = server.accept()
                except OSError:
                    return
                accepted.append(1)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()

        threading.Thread(target=reset_each, daemon=True).start()
        endpoint = f"http://127.0.0.1:{server.getsockname()[1]}"
        hub = Hub(RetryPolicy(max_retries=1, base_delay=0.01, max_delay=0.01), cache_dir=tmp_path, endpoint=endpoint)
        with pytest.raises(HubError, match="list files: still failing after 2 attempts"):
            hub.list_files("org/tiny", "a" * 40, ["*"], [])
    assert len(accepted) == 2


@pytest.mark.parametrize("large", [1, 2])
def test_weight_files_download_a_few_at_a_time(cli: Cli, fake_hub: FakeHub, tmp_path: Path, large: int) -> None:
    weights = {f"model-{i}.safetensors": bytes([i]) * (16 * 1024 * 1024) for i in range(3)}
    fake_hub.add_repo("org/big", weights)
    cat = write_catalog(tmp_path / "catalog.yaml", "models:\n  - name: big\n    hf: org/big\n")
    cli("lock", "-c", cat)
    fake_hub.max_inflight = 0
    fake_hub.file_delay = 0.2  # each in flight a while: more at once than allowed would overlap
    fake_hub.hold_until = dict.fromkeys(weights, lambda: fake_hub.max_inflight >= large)
    cli("build", "-c", cat, "--hf-workers", "8", "--hf-large-workers", str(large))
    assert fake_hub.max_inflight == large  # never exceeded, though 8 workers were free
    assert set(fake_hub.held.values()) == {True}  # and reached


def test_a_cached_small_file_is_linked_only_under_names_that_stay_in_the_cache(tmp_path: Path) -> None:
    """A Hub listing (or an HF_ENDPOINT mirror) names the paths and ids a cached file is linked
    under: a name that would leave the cache is not linked (huggingface_hub's download refuses it)."""
    from modelcar.hub import Hub

    hub = Hub(cache_dir=tmp_path / "cache")
    blob_id, commit = "a" * 40, "b" * 40
    blobs = tmp_path / "cache" / "models--org--tiny" / "blobs"
    blobs.mkdir(parents=True)
    (blobs / blob_id).write_bytes(b"{}\n")
    for path, oid, rev in (
        ("../../../escape.json", blob_id, commit),
        ("/etc/escape.json", blob_id, commit),
        ("config.json", "../" + "a" * 37, commit),
        ("config.json", blob_id, "../../" + "b" * 34),
    ):
        assert hub._cached_small("org/tiny", rev, path, oid, 3) is None
    assert not list(tmp_path.rglob("escape.json"))
    assert hub._cached_small("org/tiny", commit, "config.json", blob_id, 4) is None  # other size
    link = hub._cached_small("org/tiny", commit, "sub/config.json", blob_id, 3)
    assert link == tmp_path / "cache" / "models--org--tiny" / "snapshots" / commit / "sub" / "config.json"
    assert link.is_symlink() and link.read_bytes() == b"{}\n"
    assert not Path(os.readlink(link)).is_absolute()  # a relative link, as huggingface_hub makes them


def test_modelcar_takes_over_hub_retries_only_in_its_own_calls(fake_hub: FakeHub) -> None:
    """The hook that hands a 429 to modelcar's retry policy stays on huggingface_hub's shared
    client; other code in the process that uses huggingface_hub keeps huggingface_hub's retries."""
    from huggingface_hub.utils import http_backoff

    from modelcar.hub import Hub

    fake_hub.add_repo("org/tiny", {"config.json": b"{}"})
    hub = Hub(RetryPolicy(max_retries=0))
    commit = hub.resolve("org/tiny", "main")  # installs the hook
    fake_hub.inject("revision", status=429, headers={"Retry-After": "0"}, times=1)
    url = f"{fake_hub.url}/api/models/org/tiny/revision/main"
    # retried by huggingface_hub (429 named: its default list gained it only in 1.2)
    assert http_backoff("GET", url, max_retries=2, base_wait_time=0.01, retry_on_status_codes=429).status_code == 200
    fake_hub.inject("revision", status=429, headers={"Retry-After": "0"}, times=1)
    with pytest.raises(HubError, match="HTTP 429"):  # modelcar's own call: its policy (no retries) decides
        hub.resolve("org/tiny", commit)  # a question not asked before (a Hub asks each once)
    assert len(commit) == 40


def test_an_interrupted_run_stops_its_own_retries_not_another_s() -> None:
    """Two runs in one process (a library caller's threads): the one interrupted gives up its
    retries, those of its workers too; the other's go on."""
    import threading

    from modelcar.retry import worker_pool

    policy = RetryPolicy(max_retries=2, base_delay=0.05, max_delay=0.05)
    waiting = RetryPolicy(max_retries=2, base_delay=60, max_delay=60)  # what only the interrupt ends
    outcome: dict[str, object] = {}
    failures = iter([ConnectionResetError("peer"), ConnectionResetError("peer")])

    def flaky() -> str:
        item = next(failures, None)
        if item is not None:
            raise item
        return "ok"

    started = threading.Event()

    def dropped() -> str:
        started.set()
        raise ConnectionResetError("peer")

    other = threading.Thread(target=lambda: outcome.update(other=call_with_retry(flaky, "other", policy)))
    other.start()
    with pytest.raises(KeyboardInterrupt), worker_pool(1) as pool:
        mine = pool.submit(call_with_retry, dropped, "mine", waiting)
        assert started.wait(10)
        raise KeyboardInterrupt
    with pytest.raises(RetryGiveUp, match=r"mine: .*not retried: interrupted"):
        mine.result(timeout=10)
    other.join(timeout=10)
    assert outcome == {"other": "ok"}


@pytest.mark.parametrize(("route", "status"), [("revision", 401), ("revision", 403), ("tree", 403)])
def test_an_access_refusal_says_to_set_hf_token(
    cli: Cli, fake_hub: FakeHub, tmp_path: Path, route: str, status: int
) -> None:
    """An expired token, or a fine-grained one without this repo: one line that says what to do
    (huggingface_hub's HTTP errors are OSErrors too, and once read as a local failure)."""
    fake_hub.add_repo("org/tiny", FILES)
    fake_hub.inject(route, status=status, times=1)
    result = cli("lock", "-c", write_catalog(tmp_path / "catalog.yaml", CATALOG), code=2)
    assert f"HTTP {status}: access denied; set HF_TOKEN to a token that can read this repo" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_local_failure_in_a_hub_call_says_what_to_change() -> None:
    """huggingface_hub opens its token file for every request: out of file handles, the run said
    `OSError: [Errno 24] ...` and nothing of what to change."""
    import errno

    from modelcar.hub import _hub_error

    exc = OSError(errno.EMFILE, "Too many open files", "/root/.cache/huggingface/token")
    assert str(_hub_error(exc, "org/tiny@main", "https://huggingface.co")) == (
        "org/tiny@main: /root/.cache/huggingface/token: Too many open files (this process's limit: raise "
        "`ulimit -n`, or lower --jobs and --hf-workers)"
    )
    full = OSError(errno.ENOSPC, "No space left on device", "/cache/blobs/x.incomplete")
    assert str(_hub_error(full, "org/tiny@abc: config.json", "https://huggingface.co")) == (
        "org/tiny@abc: config.json: /cache/blobs/x.incomplete: No space left on device"
    )
    # HOME=/ for a random UID (OpenShift): the default cache is /.cache, which this user may not write
    for code in (errno.EACCES, errno.EPERM, errno.EROFS):  # another user's, or read-only media
        denied = OSError(code, os.strerror(code), "/.cache")
        assert str(_hub_error(denied, "org/tiny@abc: config.json", "https://huggingface.co")) == (
            f"org/tiny@abc: config.json: /.cache: {os.strerror(code)}; set HF_HUB_CACHE (or HF_HOME) to a "
            "directory this user can write"
        )


def test_a_cdn_that_was_reached_is_not_blamed_on_the_network() -> None:
    """A CDN connection that broke off mid-download (the CDN answered, then dropped: seen as
    RemoteProtocolError after huggingface_hub's own resumes) was worded as a network that does not
    let the CDN's host through; only a connection never made is."""
    import httpx

    from modelcar.hub import _hub_error

    request = httpx.Request("GET", "https://cdn-lfs.hf.co/repos/x?X-Amz-Signature=s3cr3t")
    what, hub = "org/tiny@abc: model.safetensors", "https://huggingface.co"
    broke = httpx.RemoteProtocolError("peer closed connection without sending complete message body", request=request)
    assert str(_hub_error(broke, what, hub)) == (
        f"{what}: RemoteProtocolError: peer closed connection without sending complete message body from "
        "cdn-lfs.hf.co, where the Hub sent the download (the connection broke off mid-download: run again)"
    )
    reset = httpx.ReadError("[Errno 104] Connection reset by peer", request=request)
    assert str(_hub_error(reset, what, hub)).endswith("(the connection broke off mid-download: run again)")
    # never reached, blocked by a proxy (its CONNECT refused), or never answering: the network's way there
    for blocked in (
        httpx.ConnectError("[Errno 111] Connection refused", request=request),
        httpx.ProxyError("403 Forbidden", request=request),
        httpx.ReadTimeout("timed out", request=request),
    ):
        assert str(_hub_error(blocked, what, hub)).endswith(
            "from cdn-lfs.hf.co, where the Hub sent the download (a network that lets huggingface.co through must "
            "let cdn-lfs.hf.co through too)"
        ), blocked


def test_downloads_redirected_to_a_signed_cdn_url_never_print_its_signature(
    cli: Cli, fake_hub: FakeHub, tmp_path: Path
) -> None:
    """The Hub answers an LFS file's /resolve/ with a redirect to its CDN, a URL signed for an hour
    (a credential while it lasts). -v shows each request huggingface_hub sends, and that URL is
    in them: the signature is not. A CDN that refuses is not a token's fault (a network that lets
    the Hub through but not the CDN, or an expired URL), and the error says so."""
    signature = "cdnSIGNATURE0123456789abcdef"
    fake_hub.cdn_signature = signature
    fake_hub.add_repo("org/tiny", FILES)
    cat = write_catalog(tmp_path / "catalog.yaml", CATALOG)
    result = cli("build", "-c", cat, "-v", "--json")
    assert json.loads(result.stdout)["models"][0]["digest"].startswith("sha256:")
    cdn = [p for m, p in fake_hub.requests if m == "GET" and p.startswith("/cdn/")]
    assert len(cdn) == 6 and all(signature in p for p in cdn)  # the 6 LFS files came from the CDN, signed
    requests = [line for line in result.stderr.splitlines() if "/cdn/" in line]
    assert len(requests) >= 6 and all("X-Amz-Signature=REDACTED" in line for line in requests)
    assert signature not in result.stdout + result.stderr

    fake_hub.add_repo("org/tiny", FILES | {"model-00000-of-00006.safetensors": b"n" * 4096})
    fake_hub.inject("cdn", status=403, times=100)
    result = cli("build", "-c", cat, "--update", "-v", code=1)
    error = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and "model-00000-of-00006.safetensors: HTTP 403 from localhost, where the Hub" in error[0]
    assert "a network that lets 127.0.0.1 through but not localhost" in error[0] and "HF_TOKEN" not in error[0]
    assert signature not in result.stdout + result.stderr

    fake_hub.inject("cdn", status=404, times=100)  # it answers, so the network lets it through
    fake_hub.faults = [f for f in fake_hub.faults if f.status == 404]
    result = cli("build", "-c", cat, "--update", code=1)
    error = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert error[0].endswith(
        "model-00000-of-00006.safetensors: HTTP 404 from localhost, where the Hub sent the download"
    )

    fake_hub.faults.clear()
    fake_hub.cdn_host = "127.0.0.2"  # where nothing listens: a CDN this network does not reach (no DNS to wait on)
    result = cli("build", "-c", cat, "--update", "--max-retries", "0", code=1)
    error = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and "(ConnectError: [Errno 111] Connection refused); raise --max-retries" in error[0]
    assert "it failed at 127.0.0.2, where the Hub sent the download (a network that lets 127.0.0.1" in error[0]
    assert signature not in result.stdout + result.stderr  # huggingface_hub's own warnings name the URL


@pytest.mark.parametrize("where", ["starting", "closing"])
def test_an_interrupt_while_downloads_start_or_end_stops_their_retries(
    fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """Ctrl-C while the downloads are handed to their threads (seen: a KeyboardInterrupt inside
    Thread.start), or while a build waits for the last ones: a download already asleep before a
    retry the Hub asked to wait 300 s for gives up, instead of holding the interpreter's exit."""
    import threading

    from modelcar import hub as hub_module
    from modelcar.lock import LockedFile

    data = {"a.json": b"{}", "b.json": b"[]"}
    commit = fake_hub.add_repo("org/tiny", data)
    fault = fake_hub.inject("file", status=503, headers={"Retry-After": "300"}, path="a.json", times=100)
    wanted = [
        ("org/tiny", commit, LockedFile(path=p, size=len(d), sha256=hashlib.sha256(d).hexdigest()))
        for p, d in data.items()
    ]
    hub = hub_module.Hub(cache_dir=tmp_path / "hf")
    real_in_run, started = hub_module.in_run, []

    def until_asleep() -> None:  # the first download was refused, and waits to retry
        while fault.times == 100:
            threading.Event().wait(0.01)

    def in_run(stop: threading.Event, fn: Callable[..., Any]) -> Callable[..., Any]:
        started.append(stop)
        if where == "starting" and len(started) == 2:
            until_asleep()
            raise KeyboardInterrupt
        return real_in_run(stop, fn)

    monkeypatch.setattr(hub_module, "in_run", in_run)
    before = set(threading.enumerate())
    with pytest.raises(KeyboardInterrupt):
        fetching = hub.start_fetch(wanted, on_file=None)
        until_asleep()
        real_shutdown = fetching._pool.shutdown

        def interrupted_shutdown(wait: bool = True, *, cancel_futures: bool = False) -> None:
            if wait:
                raise KeyboardInterrupt  # as if ^C came while it waited
            real_shutdown(wait, cancel_futures=cancel_futures)

        monkeypatch.setattr(fetching._pool, "shutdown", interrupted_shutdown)
        fetching.close()
    downloads = [t for t in set(threading.enumerate()) - before if t.name.startswith("hf-download")]
    assert downloads and started[0].is_set()
    for t in downloads:
        t.join(30)  # not the 300 s the Hub asked for
    assert not [t for t in downloads if t.is_alive()]


def test_a_library_caller_s_traceback_holds_no_signed_url(fake_hub: FakeHub, tmp_path: Path) -> None:
    """huggingface_hub's error names the CDN URL it was refused at, signature and all; modelcar's
    error leaves it out, and a service that logs the traceback must not print it either."""
    import traceback

    from modelcar import api
    from modelcar.build import BuildFailed

    signature = "cdnSIGNATUREinTRACEBACK0123"
    fake_hub.cdn_signature = signature
    fake_hub.add_repo("org/tiny", FILES)
    fake_hub.inject("cdn", status=403, times=100)
    cat = write_catalog(tmp_path / "catalog.yaml", CATALOG)
    with pytest.raises(BuildFailed) as failed:
        api.build(cat, remote=api.Remote(retry=RetryPolicy(max_retries=0), hf_cache=tmp_path / "hf"))
    error = failed.value.errors["tiny"]
    assert isinstance(error, HubError) and "HTTP 403 from localhost" in str(error)
    shown = "".join(traceback.format_exception(failed.value)) + "".join(traceback.format_exception(error))
    assert signature not in shown
    assert error.__cause__ is None and error.__context__ is None  # not there for a reporter that walks them


def test_huggingface_hub_s_own_log_lines_hold_no_signed_url(
    fake_hub: FakeHub, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """huggingface_hub logs the URL a download failed at, to the host's handlers: a library
    caller's logs get the CDN URL without its signature (the command line's formatter does its own)."""
    from huggingface_hub.utils import logging as hf_logging

    from modelcar import api
    from modelcar.build import BuildFailed

    hf_logging.get_logger()  # huggingface_hub sets its logger up first (its level from HF_HUB_VERBOSITY)
    signature = "cdnSIGNATUREinHOSTLOGS0123"
    fake_hub.cdn_signature, fake_hub.cdn_host = signature, "127.0.0.2"  # where nothing listens
    fake_hub.add_repo("org/tiny", {"config.json": b"{}", "model.safetensors": b"\1" * 2048})
    cat = write_catalog(tmp_path / "catalog.yaml", CATALOG)
    hf_logger = logging.getLogger("huggingface_hub")
    hf_logger.addHandler(caplog.handler)  # as a host does
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")
    try:
        with pytest.raises(BuildFailed):
            api.build(cat, remote=api.Remote(retry=RetryPolicy(max_retries=0), hf_cache=tmp_path / "hf"))
    finally:
        hf_logger.removeHandler(caplog.handler)
    # its request line for the CDN URL (and, from huggingface_hub 2, "Error while downloading from" it)
    assert any("/cdn/" in r.getMessage() and "X-Amz-Signature=REDACTED" in r.getMessage() for r in caplog.records)
    assert signature not in caplog.text


def test_a_hub_client_refuses_a_malformed_hf_endpoint_even_with_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub parses HF_ENDPOINT as it loads, whatever endpoint a Remote gives: a library
    caller got its raw ValueError."""
    from modelcar.errors import InputError
    from modelcar.hub import Hub

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:99999")
    with pytest.raises(InputError, match=r"^HF_ENDPOINT 'http://127.0.0.1:99999' is not a URL"):
        Hub(endpoint="https://huggingface.co")
    monkeypatch.delenv("HF_ENDPOINT")
    with pytest.raises(InputError, match=r"^the Hub endpoint 'ftp://h' is not a URL"):
        Hub(endpoint="ftp://h")
    assert Hub(endpoint="http://[::1]:8080/hf/").endpoint == "http://[::1]:8080/hf"


def test_a_file_s_bound_holds_for_the_file_s_answers_only() -> None:
    """Downloading a file, huggingface_hub asks the Hub API on the way (a Xet read token): that JSON
    answer was counted against the file's size, and a Xet file smaller than it failed."""
    from modelcar import hub

    try:  # huggingface_hub's client: httpx2 from 2.x, httpx before
        import httpx2 as client
    except ImportError:
        import httpx as client  # type: ignore[no-redef]

    def answer(path: str, size: int) -> list[bytes]:
        response = client.Response(200, content=b"x" * size, request=client.Request("GET", f"http://hub.test{path}"))
        hub._bounded(response)
        return list(response.iter_bytes())

    hub._in_our_call.active, hub._in_our_call.expect = True, 10
    try:
        assert answer("/api/models/org/m/xet-read-token/" + "a" * 40, 100) == [b"x" * 100]
        assert answer("/org/m/resolve/" + "a" * 40 + "/tiny.safetensors", 10) == [b"x" * 10]
        with pytest.raises(HubError, match="more than the 10 bytes the Hub lists for the file came"):
            answer("/org/m/resolve/" + "a" * 40 + "/tiny.safetensors", 11)
    finally:
        hub._in_our_call.active, hub._in_our_call.expect = False, None


def test_pinning_a_model_loads_no_more_of_huggingface_hub_than_it_asks_with(fake_hub: FakeHub) -> None:
    """Importing `HfApi`'s module (it loads the inference, jobs and community APIs too) cost a
    rebuild for a new commit 30 ms of its 0.37 s, which is mostly start-up. The revision and the
    listing are asked without it, and give what the Hub says."""
    files = {"model.safetensors": b"w" * 4096, "config.json": b"{}"}
    commit = fake_hub.add_repo("org/tiny", files)
    code = (
        "import json, sys\n"
        "from modelcar.hub import Hub\n"
        "hub = Hub()\n"
        "commit = hub.resolve('org/tiny', 'main')\n"
        "listed = hub.list_files('org/tiny', commit, ['*'], [])\n"
        "said = {f.path: [f.size, f.sha256] for f in listed}\n"
        "print(json.dumps([commit, said, 'huggingface_hub.hf_api' in sys.modules]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert json.loads(out) == [
        commit,
        {p: [len(d), hashlib.sha256(d).hexdigest()] for p, d in files.items()},
        False,
    ]


@pytest.mark.parametrize(
    ("entry", "said"),
    [
        (
            {"path": "w.bin", "size": 9, "oid": "a" * 40, "lfs": {"size": 9}},
            "'w.bin' as an LFS file without its sha256",
        ),
        ({"path": "w.bin", "size": 9, "oid": "a" * 40, "lfs": "x"}, "'w.bin' as an LFS file without its sha256"),
        ({"path": "c.json", "oid": "a" * 40}, "'c.json' without its size"),
        ({"path": "c.json", "size": True, "oid": "a" * 40}, "'c.json' without its size"),
        ({"path": "c.json", "size": 2}, "without its path or git blob id: 'c.json'"),
        ({"size": 2, "oid": "a" * 40}, "without its path or git blob id: None"),
    ],
)
def test_a_listing_entry_that_does_not_describe_a_file_is_said_so(entry: dict[str, Any], said: str) -> None:
    from modelcar.hub import ListedFile

    with pytest.raises(ValueError, match=re.escape(said)):
        ListedFile.of(entry)


def test_a_listed_lfs_file_is_its_lfs_size_and_sha256() -> None:
    from modelcar.hub import ListedFile

    lfs = {"path": "w.bin", "size": 134, "oid": "a" * 40, "lfs": {"oid": "b" * 64, "size": 9, "pointerSize": 134}}
    assert ListedFile.of(lfs) == ListedFile("w.bin", 9, "a" * 40, "b" * 64)
    assert ListedFile.of({"path": "c.json", "size": 2, "oid": "c" * 40}) == ListedFile("c.json", 2, "c" * 40, None)
