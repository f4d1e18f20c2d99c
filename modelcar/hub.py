"""The Hugging Face side: resolve revisions, list files, download snapshots, verify every byte.

huggingface_hub does the Hub protocol (endpoints, tokens, cache layout, resumable downloads);
this module adds what it lacks for CI at scale (DESIGN.md section 9): a retry around every call,
bounded concurrency, one download per repo@commit per run, sha256 checks of every file, and
errors that say what to do.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import inspect
import json
import logging
import os
import re
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

from modelcar.catalog import COMMIT_RE, select_files
from modelcar.checked import identity
from modelcar.errors import HubError, InputError, IntegrityError, os_error_message, without_credentials
from modelcar.fsutil import (
    TEMPS,
    atomic_write_bytes,
    iter_file,
    link_below,
    naming,
    replace_symlink,
    sha256_file,
    sweep_once,
    sweep_stale,
)
from modelcar.image import LARGE_FILE
from modelcar.lock import SHA256_RE, LockedFile, LockedModel
from modelcar.retry import (
    RETRY_STATUS,
    Flights,
    RetryGiveUp,
    RetryPolicy,
    Unreachable,
    broke_off,
    call_with_retry,
    cause_chain,
    current_run,
    http_status,
    in_run,
    request_host,
    worker_pool,
)
from modelcar.sockets import read_larger
from modelcar.stall import STALL_WINDOW, paced, read_capped
from modelcar.tarlayer import is_safe_path

log = logging.getLogger("modelcar")
T = TypeVar("T")

DEFAULT_ENDPOINT = "https://huggingface.co"


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment now (not at import time), by
    huggingface_hub's rules: HF_HUB_CACHE, then the older HUGGINGFACE_HUB_CACHE, then HF_HOME/hub
    (HF_HOME defaults under XDG_CACHE_HOME); `~` and `$VARS` expanded in each."""

    def expand(path: str) -> str:
        return os.path.expandvars(os.path.expanduser(path))

    home = expand(
        os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    )
    cache = expand(
        os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    )
    if cache.startswith("~"):  # no home directory (a random UID without HOME nor passwd entry): not ./~/...
        raise InputError(f"no home directory for the Hugging Face cache ({cache}): set HF_HOME or HF_HUB_CACHE")
    return Path(cache)


def _same_file(path: Path, seen: os.stat_result) -> bool:
    """Whether `path` (through its symlink) is still the file `seen` was of, unchanged."""
    try:
        return identity(os.stat(path)) == identity(seen)
    except OSError:
        return False


def _sha256_or_none(path: Path) -> str | None:
    """The file's sha256; None where there is no such file (any more)."""
    try:
        return sha256_file(path)
    except FileNotFoundError:
        return None


def repo_folder(repo_id: str) -> str:
    """A model repo's directory in the Hugging Face cache: `models--ORG--NAME`."""
    return "models--" + repo_id.replace("/", "--")


def sweep_partial_downloads(cache_dir: Path, repo: str) -> int:
    """Remove the partial downloads of `repo` that nothing will finish; how many went.

    huggingface_hub 2.x downloads each file into `blobs/<etag>.<8 hex>.incomplete`, a new name each
    time, and removes it when the download fails, but not when its process is killed (SIGKILL, an
    OOM kill, a CI job's timeout): a weight file's worth of disk per kill, never resumed. While it
    downloads an etag it holds `.locks/<repo folder>/<etag>.lock` (flock), so a partial whose lock
    this process can take has no writer; it is removed under that lock. (1.x's resumable
    `<etag>.incomplete` has no second dot and is left to it.)"""
    folder = repo_folder(repo)
    locks = cache_dir / ".locks" / folder
    removed = sweep_stale(
        cache_dir / folder / "blobs", "*.*.incomplete", lock_of=lambda p: locks / f"{p.name.split('.', 1)[0]}.lock"
    )
    if removed:
        log.info("%s: removed %d partial download(s) a killed run left in the HF cache", repo, removed)
    return removed


def hf_endpoint(given: str | None = None) -> str:
    """The Hub's URL: `given`, or HF_ENDPOINT, or the Hub's own; one that is no http(s) URL is
    refused here (a typo in HF_ENDPOINT failed deep in the HTTP client with a traceback)."""
    where = "the Hub endpoint" if given else "HF_ENDPOINT"
    endpoint = (given or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    try:
        parts = urlsplit(endpoint)
        parts.port  # noqa: B018 -- raises for a port out of range
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("not an http:// or https:// URL with a host")
    except ValueError as exc:
        if "@" in endpoint:  # a password in it, maybe: neither it nor the parser's words about it
            raise InputError(f"{where} is not a URL (an http:// or https:// URL with a host)") from None
        raise InputError(f"{where} {endpoint!r} is not a URL ({exc})") from None
    return endpoint


def git_blob_id(size: int, chunks: Iterable[bytes]) -> tuple[str, str]:
    """(git blob sha1, sha256) of a file's content in one pass."""
    sha1 = hashlib.sha1(f"blob {size}\0".encode(), usedforsecurity=False)
    sha256 = hashlib.sha256()
    for chunk in chunks:
        sha1.update(chunk)
        sha256.update(chunk)
    return sha1.hexdigest(), sha256.hexdigest()


@dataclass(frozen=True)
class FileKey:
    repo: str
    commit: str
    path: str


def download_key(repo: str, commit: str, file: LockedFile) -> tuple[str, ...]:
    """What makes two downloads one: a weight file by its content (the same shard in two repos, a
    model and its mirror under another org, is downloaded once), any other by repo, commit and path."""
    return ("sha256", file.sha256, str(file.size)) if file.size >= LARGE_FILE else (repo, commit, file.path)


@functools.cache
def _quiet_bars() -> dict[str, type]:
    """hf_hub_download's argument for no bar of its own: modelcar draws one for all downloads, or
    none where the caller asked for none (a library call; the command line also sets
    HF_HUB_DISABLE_PROGRESS_BARS, which releases that do not take a `tqdm_class` here heed)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils.tqdm import tqdm

    if "tqdm_class" not in inspect.signature(hf_hub_download).parameters:
        return {}

    class Quiet(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **(kwargs | {"disable": True}))  # type: ignore[no-untyped-call]

    return {"tqdm_class": Quiet}


class HubRefused(HubError, InputError):
    """The Hub says no to what the catalog or the token asks (no such repo or revision, a gated
    repo, access denied): asking again gets the same answer; the catalog's `hf:` or `revision:`,
    or the token, is to change (exit 2)."""


class RevisionNotFound(HubRefused):
    """The Hub has no such branch, tag or commit."""


def _hub_error(exc: BaseException, what: str, endpoint: str, token: bool = False) -> HubError:
    """Turn a huggingface_hub error into one line saying what to do, with no credentials a URL in
    it carried (an HF_ENDPOINT of `https://user:password@mirror`). `token`: one was sent."""
    error = _hub_error_of(exc, what, endpoint, token)
    return type(error)(without_credentials(str(error)))


def _says_more(exc: BaseException) -> bool:
    """Whether an exception, or one it came from, says what without_credentials leaves out."""
    return any(without_credentials(str(e)) != str(e) for e in cause_chain(exc))


def _hub_error_of(exc: BaseException, what: str, endpoint: str, token: bool) -> HubError:
    from huggingface_hub.errors import (
        GatedRepoError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    hub = urlsplit(endpoint).hostname
    # A host other than the Hub's is where it sent a download: its CDN, or a proxy in front of
    # that. A failure there is the network's (or an expired signed URL's), never the token's.
    cdn = host if (host := request_host(exc)) not in (None, hub) else None
    status = http_status(exc)
    via = f"{cdn}, where the Hub sent the download"
    if status is None and broke_off(exc):  # it was reached, then the connection broke
        via += " (the connection broke off mid-download: run again)"
    elif status is None:  # no answer from there: the network's way there (a refusal, a proxy's block)
        via += f" (a network that lets {hub} through must let {cdn} through too)"
    if isinstance(exc, RetryGiveUp):
        return HubError(f"{exc}; it failed at {via}" if cdn else str(exc))
    if isinstance(exc, GatedRepoError):
        return HubRefused(f"{what}: the repo is gated: accept its terms on the Hub and set HF_TOKEN")
    if isinstance(exc, RepositoryNotFoundError):  # the Hub answers so for a repo the token may not read, too
        if token:
            return HubRefused(
                f"{what}: repository not found on {endpoint}, or the token in use (HF_TOKEN or the saved "
                "login) cannot read it: check `hf:` and the token"
            )
        return HubRefused(f"{what}: repository not found on {endpoint} (check `hf:`; for a private repo set HF_TOKEN)")
    if isinstance(exc, RevisionNotFoundError):
        return RevisionNotFound(f"{what}: revision not found (check `revision:` in the catalog)")
    if isinstance(exc, RemoteEntryNotFoundError):
        return HubError(f"{what}: file not found at this commit")
    # A local failure (the cache's disk, the process's open files) carries an errno; huggingface_hub's
    # HTTP errors are OSErrors too, without one.
    if isinstance(exc, OSError) and exc.errno is not None:
        # the cache (or the token file beside it) this user may not write: HOME=/ for a random UID
        cache = exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
        hint = "; set HF_HUB_CACHE (or HF_HOME) to a directory this user can write" if cache else ""
        return HubError(f"{what}: {os_error_message(exc)}{hint}")
    if status is not None and status[0] in (401, 403):
        if cdn:
            return HubError(
                f"{what}: HTTP {status[0]} from {cdn}, where the Hub sent the download: a network that lets "
                f"{hub} through but not {cdn} (allow it), or a signed URL that expired (run again)"
            )
        return HubRefused(f"{what}: HTTP {status[0]}: access denied; set HF_TOKEN to a token that can read this repo")
    detail = f"HTTP {status[0]}" if status else f"{type(exc).__name__}: {exc}".splitlines()[0]
    if cdn:
        return HubError(f"{what}: {detail} from {via}")
    return HubError(f"{what}: {detail}")


TREE_MAX = 200_000  # entries of a commit's listing read at most (a model repo has tens, a few thousands)
TREE_PAGES = 10_000  # pages of it (the Hub's hold 1,000 entries, or 50 with details)
API_MAX = 64 << 20  # bytes of one answer of the Hub's API read at most (a page of a listing: ~300 KB)


@dataclass(frozen=True)
class ListedFile:
    """A file of a commit as the Hub lists it: every file with its git blob id, an LFS file with
    the sha256 the Hub computed too (`lfs_sha256`)."""

    path: str
    size: int
    blob_id: str
    lfs_sha256: str | None

    @classmethod
    def of(cls, entry: dict[str, Any]) -> ListedFile:
        """ValueError for an entry that does not say what a file's must."""
        path, size, blob_id, lfs = entry.get("path"), entry.get("size"), entry.get("oid"), entry.get("lfs")
        if lfs is not None:
            size = lfs.get("size") if isinstance(lfs, dict) else None
            lfs = lfs.get("oid") if isinstance(lfs, dict) else None
            if not (isinstance(lfs, str) and SHA256_RE.fullmatch(lfs)):
                raise ValueError(f"the Hub lists {path!r} as an LFS file without its sha256")
        if not isinstance(path, str) or not isinstance(blob_id, str):
            raise ValueError(f"the Hub lists a file without its path or git blob id: {path!r}")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError(f"the Hub lists {path!r} without its size")
        return cls(path=path, size=size, blob_id=blob_id, lfs_sha256=lfs)


class HubBusy(Exception):
    """A Hub answer to retry (429, 408, 5xx), raised out of huggingface_hub's own request loop so that
    modelcar's retry policy, not huggingface_hub's, decides: it carries the response's headers
    (Retry-After, RateLimit) for that policy."""

    def __init__(self, response: Any) -> None:
        super().__init__(f"HTTP {response.status_code}")
        self.response = response


_in_our_call = threading.local()  # set while this thread is inside a Hub call of modelcar's


def _hub_busy(response: Any) -> None:
    """A response hook on huggingface_hub's HTTP client. Its file GETs retry 408 and 429 by
    themselves, up to 5 times with Retry-After + 1 s of sleep each, and its HEADs and listings
    5xx too (sleeping 1, 2, 4, 8, 8 s), inside one of modelcar's attempts: with Retry-After: 300
    one attempt took 25 minutes, a 503 47 s under --retry-deadline 3, and every inner retry
    added to the storm. Only modelcar's own
    calls are answered so: anything else in the process that uses huggingface_hub keeps its
    retries. (Downloads through hf_xet do not go through this client.)"""
    if response.status_code in RETRY_STATUS and getattr(_in_our_call, "active", False):
        response.close()
        raise HubBusy(response)


def _bounded(response: Any) -> None:
    """A response hook on huggingface_hub's HTTP client, in modelcar's own calls: a file's body ends
    at the size the Hub listed for it, over every resumed request (huggingface_hub writes whatever
    comes and checks the size after the last byte: a mirror that sent without end, chunked, filled
    the disk with one `.incomplete` file), moves at a pace (paced), and nested content codings are
    refused (each decodes its input a thousand times over before a byte is counted)."""
    if not getattr(_in_our_call, "active", False):
        return
    limit = getattr(_in_our_call, "expect", None)
    # the file's answers only: not the Hub API's (a Xet read token, asked on the way)
    if limit is None or response.status_code not in (200, 206) or "/api/" in response.url.path:
        return
    where = f"{response.url.host}{response.url.path}"
    codings = [c.strip() for c in response.headers.get("Content-Encoding", "").lower().split(",")]
    if len([c for c in codings if c not in ("", "identity")]) > 1:
        response.close()
        raise HubError(f"{where}: sent with Content-Encoding {', '.join(codings)}: more than one coding, not decoded")
    resumed = re.fullmatch(r"bytes=(\d+)-", response.request.headers.get("Range", ""))
    start = int(resumed.group(1)) if resumed and response.status_code == 206 else 0
    whole = response.iter_bytes
    window = getattr(_in_our_call, "window", STALL_WINDOW)

    def iter_bytes(*args: Any, **kwargs: Any) -> Iterator[bytes]:
        seen = start
        # a server sending a byte every few seconds never trips the read timeout: one file of a
        # build took weeks, past --retry-deadline
        for chunk in paced(whole(*args, **kwargs), window):
            seen += len(chunk)
            if seen > limit:
                response.close()
                raise HubError(f"{where}: more than the {limit} bytes the Hub lists for the file came: not kept")
            yield chunk

    response.iter_bytes = iter_bytes


class _Redacting(logging.Filter):
    """huggingface_hub logs the URL a download failed at ("Error while downloading from URL"), a
    CDN URL signed for an hour included, to whatever handlers the host process has."""

    def filter(self, record: logging.LogRecord) -> bool:
        shown = without_credentials(record.getMessage())
        if shown != record.getMessage():
            record.msg, record.args = shown, None
        return True


def _redact_hub_logs() -> None:
    """Leave secrets out of the lines huggingface_hub logs with a URL in them (a logger's filter
    sees only that logger's own records, so each one that names URLs gets one)."""
    for name in ("huggingface_hub.file_download", "huggingface_hub.utils._http"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Redacting) for f in logger.filters):
            logger.addFilter(_Redacting())


def _our_hooks() -> None:
    """Put the hooks on huggingface_hub's shared client (made anew after a connection error)."""
    from huggingface_hub import get_session

    hooks = get_session().event_hooks
    if _hub_busy not in hooks["response"]:
        hooks["response"] = [*hooks["response"], _hub_busy, _bounded]


class Hub:
    """A Hub client with retries, a bounded worker pool and sha256 verification. One run's: each
    question (a revision's commit, a commit's files) is asked once per Hub, so entries that share
    a repo pin the same commit; a new Hub sees a branch that moved since."""

    def __init__(
        self,
        policy: RetryPolicy | None = None,
        workers: int = 8,
        cache_dir: Path | None = None,
        sleep: Callable[[float], None] | None = None,
        large_workers: int = 2,
        endpoint: str | None = None,
        token: str | None = None,
    ) -> None:
        """`cache_dir`, `endpoint` and `token` default to huggingface_hub's environment (HF_HUB_CACHE,
        HF_ENDPOINT, HF_TOKEN or the saved login): given, they hold for this client only, so a
        process can serve several Hubs or tokens at once."""
        hf_endpoint()  # before huggingface_hub loads: it parses HF_ENDPOINT as it does, whatever is given
        endpoint = hf_endpoint(endpoint)
        from huggingface_hub import constants

        # huggingface_hub re-cuts each download into 10 MiB chunks (httpx's ByteChunker: every byte
        # copied three more times, into fresh memory each time). Without a chunk size the pieces the
        # socket gives (64 KiB) go straight to the file: a 1 GiB download, 2 at a time, took 1.4-1.6 s
        # and 1.9-2.2 CPU-s instead of 2.3-2.5 s and 3.7-4.0 CPU-s with 1 MiB chunks, and less memory.
        setattr(constants, "DOWNLOAD_CHUNK_SIZE", None)  # noqa: B010 -- typed int, None is httpx's "as they come"
        _redact_hub_logs()
        for stack in ("httpcore2", "httpcore"):  # what huggingface_hub 2.x and 1.x download with
            if (module := sys.modules.get(stack)) is not None:
                read_larger(module.HTTP11Connection)
        self.policy = policy or RetryPolicy()
        # a transfer that moves almost nothing for this long fails (paced), within --retry-deadline
        self.stall_window = min(STALL_WINDOW, self.policy.deadline)
        self.workers = max(1, workers)
        # Weight files download a few at a time, in the order the layers need them: the first
        # finishes early and its upload overlaps the next downloads (on 2 cores, 8 parallel 256 MiB
        # downloads made the first upload start only after all of them: 6.8 s vs 4.7-5.2 s for a
        # 1 GiB cold push). Raise it when the Hub, not this machine, is the bottleneck.
        self.large_workers = max(1, min(large_workers, self.workers))
        self.cache_dir = cache_dir or hf_cache_dir()
        self.endpoint = endpoint
        self.unreachable = Unreachable(f"the Hub ({endpoint})")
        self.token = token
        self._sleep = sleep
        self._asked: Flights[tuple[str, ...], Any] = Flights()  # what this run asked the Hub, by question
        self._asking = threading.BoundedSemaphore(self.workers)  # questions in flight, however many askers
        self._made: set[Path] = set()  # snapshot directories made in this run
        self._by_path: dict[tuple[str, str], dict[str, ListedFile]] = {}  # a commit's listing, by path

    def _sends_token(self) -> bool:
        """Whether requests carry a token: this client's, or huggingface_hub's (HF_TOKEN, saved login)."""
        from huggingface_hub import get_token

        return bool(self.token or get_token())

    def _once(self, key: tuple[str, ...], ask: Callable[[], T]) -> T:
        """The answer to one question of the Hub, asked once per run however many catalog entries
        (or threads) want it: 200 entries over 50 repos made 400 requests where 100 do. A failed
        answer is not kept: a later asker tries again."""

        def bounded() -> T:
            with self._asking:
                return ask()

        answer: T = self._asked.once(key, bounded)
        return answer

    def _call(self, fn: Callable[[], T], what: str) -> T:
        def once() -> T:
            _our_hooks()
            _in_our_call.active = True
            try:
                return fn()
            finally:
                _in_our_call.active = False

        self.unreachable.check(what, HubError)
        try:
            return call_with_retry(once, what, self.policy, sleep=self._sleep)
        except (HubError, IntegrityError):
            raise
        except Exception as exc:
            if isinstance(exc, RetryGiveUp):
                self.unreachable.note(exc)
            error = _hub_error(exc, what, self.endpoint, self._sends_token())
            # The cause stays for a traceback, unless its words hold what the error's leave out (a
            # signed URL in huggingface_hub's message): a service logging it would print that.
            if not _says_more(exc):
                raise error from exc
        raise error  # outside the handler: not even as its __context__

    # --- lock -------------------------------------------------------------------------------

    def resolve(self, repo: str, revision: str) -> str:
        """The 40-hex commit a branch, tag or commit names."""

        def ask() -> str:
            url = f"{self.endpoint}/api/models/{repo}/revision/{quote(revision, safe='')}"
            info, _ = self._call(lambda: self._get(url), f"{repo}@{revision}")
            sha = info.get("sha") if isinstance(info, dict) else None
            if not isinstance(sha, str) or not COMMIT_RE.fullmatch(sha):
                raise HubError(f"{repo}@{revision}: the Hub did not return a commit hash")
            return sha

        return self._once(("resolve", repo, revision), ask)

    def _get(self, url: str, params: dict[str, Any] | None = None) -> tuple[Any, str | None]:
        """One GET of the Hub's API: (its JSON, the URL of the next page, if its Link header names
        one). With huggingface_hub's client, headers (token, user agent) and errors
        (RepositoryNotFoundError, GatedRepoError, ...): what `HfApi` would send, without loading
        `HfApi` (importing its module cost a rebuild for a new commit 30 ms of its 0.37 s)."""
        from modelcar.stores.registry_client import origin  # httpx is loaded by now: huggingface_hub's client

        body, r = self._stream(url, API_MAX, params)
        if body is None:
            raise HubError(f"{r.url.host}{r.url.path}: an answer of the Hub's API over {API_MAX} bytes: not read")
        following = r.links.get("next", {}).get("url")
        if not isinstance(following, str):
            return json.loads(body), None
        if origin(following) != origin(self.endpoint):  # the token goes to the Hub only
            raise HubError(f"{r.url.host}{r.url.path}: the next page of the answer is on another host: not followed")
        return json.loads(body), following

    def _stream(self, url: str, cap: int, params: dict[str, Any] | None = None) -> tuple[bytes | None, Any]:
        """One GET with huggingface_hub's client (it follows redirects: a file's to its CDN), headers
        (token, user agent) and errors: its body, read at a pace (paced), None past `cap` bytes; and
        the answer, for its headers."""
        from huggingface_hub import get_session, hf_raise_for_status
        from huggingface_hub.utils import build_hf_headers  # type: ignore[attr-defined]

        with get_session().stream("GET", url, params=params, headers=build_hf_headers(token=self.token)) as r:
            if r.status_code >= 400:
                r.read()
                hf_raise_for_status(r)
            return read_capped(r, cap, self.stall_window), r

    def _tree(self, repo: str, commit: str) -> list[ListedFile]:
        """Every file of the repo at `commit`, as the Hub lists it."""

        def ask() -> list[ListedFile]:
            files = []
            for n, e in enumerate(self._listing(repo, commit), 1):
                if n > TREE_MAX:
                    raise HubError(f"{repo}@{commit[:12]}: the Hub lists more than {TREE_MAX} entries: not a model")
                if isinstance(e, dict) and e.get("type") == "file":
                    try:
                        files.append(ListedFile.of(e))
                    except ValueError as exc:
                        raise HubError(f"{repo}@{commit[:12]}: {exc}") from None
            return files

        return self._once(("tree", repo, commit), lambda: self._call(ask, f"{repo}@{commit[:12]}: list files"))

    def _listing(self, repo: str, commit: str) -> Iterator[Any]:
        """The entries of a commit's recursive listing, page after page (each answer's Link header
        names the next). Asked here, not through `HfApi.list_repo_tree`: that one retries a failed
        connection itself, five times over 23 s of sleeps, inside each of modelcar's attempts
        (--max-retries 0 --retry-deadline 1 took 23 s, and a Hub under load got six requests for
        one). Each request here is one attempt of modelcar's, whose retry starts the listing over."""
        url = f"{self.endpoint}/api/models/{repo}/tree/{commit}"
        params: dict[str, Any] | None = {"recursive": True, "expand": False}
        # a Hub that pages without end took the run's memory (3.7 GiB, then MemoryError); a model's
        # listing has a few pages at most
        for _ in range(TREE_PAGES):
            page, following = self._get(url, params)
            if not isinstance(page, list):
                raise HubError(f"{repo}@{commit[:12]}: the Hub's listing of the commit is not a list of files")
            yield from page
            if following is None:
                return
            url, params = following, None  # the next page's URL carries the query
        raise HubError(f"{repo}@{commit[:12]}: more than {TREE_PAGES} pages of a listing: not a model's")

    def list_files(
        self, repo: str, commit: str, include: list[str], exclude: list[str], earlier: LockedModel | None = None
    ) -> list[LockedFile]:
        """Path, size and sha256 of every selected file at `commit`, downloading no LFS file.

        The Hub lists sha256 only for LFS files; small git-stored files are downloaded (into the
        cache, where the build finds them), checked against their git blob id, and hashed. With
        `earlier` (the repo's entry at another commit), a small file the cache holds as that
        commit's file of the same git blob id keeps that entry's sha256, read no more: a new commit
        of a repo of 3,000 small files hashed them all again (a build checks each against the lock
        as it reads it all the same).
        """

        what = f"{repo}@{commit[:12]}"
        selected = select_files(self._tree(repo, commit), include, exclude, key=lambda f: f.path)
        for f in selected:
            if not is_safe_path(f.path):
                raise HubError(f"{what}: the Hub lists a file at {f.path!r}, outside the repo: not taken")
        if not selected:
            return []
        out = [LockedFile(path=f.path, size=f.size, sha256=f.lfs_sha256) for f in selected if f.lfs_sha256 is not None]
        small = [f for f in selected if f.lfs_sha256 is None]

        before = {f.path: f for f in earlier.files} if earlier is not None else {}

        def hash_small(f: ListedFile) -> LockedFile:
            return self._once(("small", repo, commit, f.path), lambda: known(f) or check_small(f))

        def known(f: ListedFile) -> LockedFile | None:
            """The earlier entry's sha256, where the earlier commit's file is this very git blob (its
            snapshot link names the blob by its git blob id) and the cache holds it."""
            old = before.get(f.path)
            link = self._snapshot_file(repo, earlier.commit, f.path) if earlier is not None else None
            if old is None or old.size != f.size or link is None:
                return None
            try:
                if PurePosixPath(os.readlink(link)).name != f.blob_id:
                    return None
            except OSError:
                return None
            if self._cached_small(repo, commit, f.path, f.blob_id, f.size) is None:
                return None
            return LockedFile(path=f.path, size=f.size, sha256=old.sha256)

        def check_small(f: ListedFile) -> LockedFile:
            cached = self._cached_small(repo, commit, f.path, f.blob_id, f.size)
            if cached is not None:
                blob_id, sha256 = git_blob_id(f.size, iter_file(cached))
                if blob_id == f.blob_id:
                    return LockedFile(path=f.path, size=f.size, sha256=sha256)
                self._evict(repo, cached)  # not what its name says: fetch it
            return LockedFile(path=f.path, size=f.size, sha256=self._fetch_small(repo, commit, f))

        with worker_pool(self.workers) as pool:  # the file system's calls overlap there too
            out += list(pool.map(hash_small, small))
        return sorted(out, key=lambda f: f.path)

    # --- download ---------------------------------------------------------------------------

    def download(self, repo: str, commit: str, path: str, size: int | None = None) -> Path:
        """One file into the HF cache (reused when already complete there), with retries. `size`:
        the file's, as the Hub lists it: no more of it is taken."""
        snapshot = self._snapshot_file(repo, commit, path)
        if snapshot is not None and snapshot.exists():
            # what hf_hub_download returns for a commit's file the cache holds, without its
            # per-call work (a new commit of a repo of 3,000 small files: a tenth of the run)
            return snapshot
        # A small file in one GET, not hf_hub_download's HEAD and GET (a build whose lock was made
        # elsewhere: a CI worker's empty cache), named by the listing's git blob id (one listing per
        # repo and commit in a run); a file the listing does not give so goes below.
        if (
            snapshot is not None
            and size is not None
            and size < LARGE_FILE
            and (listed := self._listed(repo, commit, path)) is not None
            and listed.lfs_sha256 is None
            and listed.size == size
        ):
            self._fetch_small(repo, commit, listed)
            return snapshot
        from huggingface_hub import hf_hub_download

        what = f"{repo}@{commit[:12]}: {path}"
        download: Callable[..., str] = hf_hub_download
        quiet = _quiet_bars()

        def fetch() -> str:
            _in_our_call.expect, _in_our_call.window = size, self.stall_window
            try:
                with naming(self.cache_dir):  # a full disk is said of the HF cache (not of the layout)
                    return download(
                        repo,
                        path,
                        revision=commit,
                        cache_dir=self.cache_dir,
                        endpoint=self.endpoint,
                        token=self.token,
                        **quiet,
                    )
            finally:
                _in_our_call.expect = None

        try:
            local = self._call(fetch, what)
        except RevisionNotFound as exc:  # a commit the lock pins, which the Hub no longer has
            raise RevisionNotFound(
                f"{what}: commit {commit} is not on the Hub any more (its history rewritten?): "
                "`modelcar lock --update` pins what the catalog's revision names now"
            ) from exc
        return Path(local)

    def _snapshot_file(self, repo: str, commit: str, path: str) -> Path | None:
        """Where the HF cache keeps a commit's file; None for names not to make cache paths of
        (huggingface_hub checks them, and refuses)."""
        name = PurePosixPath(path)
        if name.is_absolute() or ".." in name.parts or not COMMIT_RE.fullmatch(commit):
            return None
        return self.cache_dir / repo_folder(repo) / "snapshots" / commit / path

    def _listed(self, repo: str, commit: str, path: str) -> ListedFile | None:
        """The Hub's listing of `commit` for the file at `path`; None where it lists none or cannot
        be had (the caller's download or check then says why)."""
        try:
            listing = self._tree(repo, commit)
        except HubError:
            return None
        # by path: a repo of 3,000 small files looked each up in the whole list (made again by a
        # thread that asks meanwhile: no lock held while the Hub is asked)
        key = (repo, commit)
        if (by_path := self._by_path.get(key)) is None:
            by_path = self._by_path.setdefault(key, {e.path: e for e in listing})
        return by_path.get(path)

    def _fetch_small(self, repo: str, commit: str, f: ListedFile) -> str:
        """A small (git-stored) file of `commit` into the HF cache with one GET, laid out as
        huggingface_hub lays it out (`blobs/<git blob id>`, the snapshot's link to it); its sha256.
        hf_hub_download asks a HEAD first: two Hub requests a file, 6,000 for a repo of 3,000
        tokenizer files, and requests are what the Hub answers 429 to. The bytes are checked against
        the git blob id the listing gives before a blob is named by it."""
        what = f"{repo}@{commit[:12]}: {f.path}"
        url = f"{self.endpoint}/{repo}/resolve/{commit}/{quote(f.path)}"

        def get() -> bytes:
            data, _ = self._stream(url, f.size)
            if data is None:
                raise HubError(f"{what}: the Hub sent more than the {f.size} bytes it lists; try again")
            return data

        data = self._call(get, what)
        blob_id, sha256 = git_blob_id(len(data), [data])
        if blob_id != f.blob_id:
            raise IntegrityError(
                f"{what}: git blob id mismatch: the Hub lists {f.blob_id}, the downloaded bytes "
                f"({len(data)} of {f.size}) give {blob_id}; try again"
            )
        blob = self.cache_dir / repo_folder(repo) / "blobs" / blob_id
        with naming(blob):  # a full disk is said of the HF cache
            # a directory of thousands of blobs: swept for killed runs' temporary files once a run
            sweep_once(blob.parent, TEMPS)
            atomic_write_bytes(blob, data, sweep=False)
        if self._cached_small(repo, commit, f.path, blob_id, f.size) is None:
            raise HubError(f"{what}: not linked into the HF cache's snapshot of {commit[:12]}")
        return sha256

    def _cached_small(self, repo: str, commit: str, path: str, blob_id: str, size: int) -> Path | None:
        """A small file of a new commit that the cache holds from an earlier one, linked into the
        new commit's snapshot as huggingface_hub would link it: no request for it, so a new commit
        costs the Hub one request per changed small file, not one per small file. huggingface_hub
        names a small (git-stored) file's blob by its git blob id; its bytes are checked against
        that id before use. None when the cache does not hold it."""
        link = self._snapshot_file(repo, commit, path)
        if link is None or not COMMIT_RE.fullmatch(blob_id or ""):
            return None
        blob = self.cache_dir / repo_folder(repo) / "blobs" / blob_id
        try:
            if blob.stat().st_size != size:
                return None
        except OSError:
            return None
        if not link.exists():
            target = "../" * (len(PurePosixPath(path).parts) + 1) + f"blobs/{blob_id}"  # as relpath would say it
            if link.parent not in self._made:
                link.parent.mkdir(parents=True, exist_ok=True)
                self._made.add(link.parent)
            try:
                os.symlink(target, link)  # new: one call (another run's link, made meanwhile, is the same)
            except FileExistsError:
                replace_symlink(link, target)
        return link

    def _evict(self, repo: str, snapshot_file: Path) -> None:
        """Remove a bad file from the cache so neither this run nor a later one reuses it: the
        snapshot's entry and the repo's blob it links to, nothing a link planted in the cache leads
        to (a snapshot file linked to ~/.bashrc would have taken it along)."""
        where = Path(os.path.abspath(snapshot_file)).parent
        try:
            blob: Path | None = Path(os.path.normpath(where / os.readlink(snapshot_file)))
        except OSError:  # a file, not a link (a cache made with copies): the snapshot's entry is all
            blob = None
        if blob is not None and (blob.parent.name, blob.parent.parent.name) != ("blobs", repo_folder(repo)):
            blob = None  # not one of the repo's blobs: the link goes, not what it leads to
        for directory in (where, *([blob.parent] if blob is not None else [])):
            if (link := link_below(self.cache_dir, directory)) is not None:
                raise OSError(errno.ELOOP, f"{link} leads out of the Hugging Face cache through a symbolic link")
        snapshot_file.unlink(missing_ok=True)
        if blob is not None:
            blob.unlink(missing_ok=True)  # the blob's own entry: a link there is not followed either

    def refetch(self, repo: str, commit: str, file: LockedFile, seen: os.stat_result | None = None) -> Path:
        """A file whose bytes did not match the lock: throw the cached copy away, download it once
        more and check it; a second mismatch fails, naming the file and both digests. `seen`: the
        copy found bad, where known: another run that found it bad too may have put a good one in
        its place since, which is checked and kept, not thrown away under that run."""
        log.warning("%s@%s: %s: sha256 mismatch, downloading again", repo, commit[:12], file.path)
        cached = self.cache_dir / repo_folder(repo) / "snapshots" / commit / file.path
        if seen is not None and not _same_file(cached, seen) and _sha256_or_none(cached) == file.sha256:
            return cached
        if cached.is_symlink() or cached.exists():
            try:
                self._evict(repo, cached)
            except OSError as exc:  # a shared cache this user may not write (read-only, another's)
                raise IntegrityError(
                    f"{repo}@{commit[:12]}: {file.path}: the HF cache's copy does not match the lock (sha256 "
                    f"{file.sha256} expected) and cannot be replaced here ({os_error_message(exc)}): repair that "
                    "cache (`hf cache verify`), or set HF_HUB_CACHE to a directory this user can write"
                ) from None
        for attempt in range(3):
            local = self.download(repo, commit, file.path, file.size)
            if (actual := _sha256_or_none(local)) is not None or attempt == 2:
                break
            # gone as it was read: another run threw it away (one older than `seen`)
        if actual is None:
            raise IntegrityError(f"{repo}@{commit[:12]}: {file.path}: removed from the HF cache as it was downloaded")
        if actual == file.sha256:
            return local
        if self._listed_as(repo, commit, file.path, local) == actual:
            raise IntegrityError(
                f"{repo}@{commit[:12]}: {file.path}: the lock has sha256 {file.sha256}, but the Hub lists this "
                f"commit's file as {actual} and serves that: the lock's entry is not this commit's (edited by "
                "hand, or merged from two sides?): take catalog.lock from one side, or drop the model's entry "
                "from it and run `modelcar lock` (a commit's files are listed again only for an entry made anew)"
            )
        self._evict(repo, local)
        raise IntegrityError(
            f"{repo}@{commit[:12]}: {file.path}: sha256 mismatch after two downloads: "
            f"expected {file.sha256}, got {actual}; no image was written from these bytes"
        )

    def _listed_as(self, repo: str, commit: str, path: str, local: Path) -> str | None:
        """The sha256 the Hub's listing of `commit` gives the file at `path` (LFS files carry it; a
        small file's is that of `local` when its git blob id is the listed one); None if unknown."""
        if (listed := self._listed(repo, commit, path)) is None:
            return None
        if listed.lfs_sha256 is not None:
            return listed.lfs_sha256
        blob_id, sha256 = git_blob_id(listed.size, iter_file(local))
        return sha256 if blob_id == listed.blob_id else None

    def start_fetch(
        self,
        wanted: list[tuple[str, str, LockedFile]],
        on_file: Callable[[LockedFile], None] | None = None,
    ) -> Fetching:
        """Start downloading files, each repo@commit/path once, in the given order, at most
        `workers` at a time; the caller takes each file as soon as it is there. The files are
        not hashed here: the layer that reads them checks their sha256 in the same pass
        (checked.read_checked), and `refetch` replaces one found bad."""
        return Fetching(self, wanted, on_file)


class Fetching:
    """Downloads in flight. `path` waits for one file (raising its error), so a layer can be
    built or uploaded as soon as its files are in, while the others still download. A failed
    file does not stop the others: what completes stays in the cache for the next run."""

    def __init__(
        self, hub: Hub, wanted: list[tuple[str, str, LockedFile]], on_file: Callable[[LockedFile], None] | None
    ) -> None:
        self._pool = ThreadPoolExecutor(hub.workers, thread_name_prefix="hf-download")
        self._stop = current_run()  # the downloads are the caller's run's: interrupted, they stop retrying
        self._futures: dict[FileKey, Future[Path]] = {}
        # a file another repo's download brings too: its own download, should that one fail (a repo
        # this token may not read)
        self._own: dict[FileKey, Callable[[], Path]] = {}
        large = threading.Semaphore(hub.large_workers)

        def one(repo: str, commit: str, f: LockedFile) -> Path:
            if f.size >= LARGE_FILE:
                with large:
                    path = hub.download(repo, commit, f.path, f.size)
            else:
                path = hub.download(repo, commit, f.path, f.size)
            if on_file is not None:
                on_file(f)
            return path

        try:
            started: dict[tuple[str, ...], Future[Path]] = {}
            for repo, commit, f in wanted:
                key, same = FileKey(repo, commit, f.path), download_key(repo, commit, f)
                if key in self._futures:
                    continue
                if same in started:
                    self._futures[key] = started[same]
                    self._own[key] = functools.partial(in_run(self._stop, one), repo, commit, f)
                else:
                    self._futures[key] = started[same] = self._pool.submit(in_run(self._stop, one), repo, commit, f)
        except BaseException as exc:  # ^C while threads start: those started are not left retrying
            self.close(interrupted=isinstance(exc, (KeyboardInterrupt, SystemExit)))
            raise

    def path(self, key: FileKey) -> Path:
        try:
            return self._futures[key].result()
        except Exception:
            if (own := self._own.pop(key, None)) is None:
                raise
            log.debug("%s@%s: %s: from its own repo", key.repo, key.commit[:12], key.path)
            return own()

    def close(self, *, interrupted: bool = False) -> None:
        """Wait for downloads still running; drop those not started (after a failure, or ^C).
        `interrupted`: wait for none; their retries give up."""
        if interrupted:
            self._stop.set()
        try:
            self._pool.shutdown(wait=not interrupted, cancel_futures=True)
        except (KeyboardInterrupt, SystemExit):  # ^C while waiting for them: wait no more
            self.close(interrupted=True)
            raise


class LazyHub:
    """Create the Hub client only when an `hf` model needs it: path-only catalogs stay offline."""

    def __init__(self, factory: Callable[[], Hub]) -> None:
        self._factory = factory
        self._hub: Hub | None = None
        self._lock = threading.Lock()

    def __call__(self) -> Hub:
        with self._lock:
            if self._hub is None:
                self._hub = self._factory()
            return self._hub
