"""The lock file: every model pinned to a commit and to the exact bytes of each file.

The lock is committed to git and reviewed in pull requests, so it must be byte-identical when
nothing changed (sorted keys and lists, no timestamps, no absolute paths) and say in plain YAML
what a reviewer needs: source, revision, commit, files with size and sha256, image digest.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from modelcar.catalog import COMMIT_RE, Catalog, ModelSpec, check_revision, yaml_problem
from modelcar.errors import LockError, ModelcarError, NotBuilt, NotLocked, os_error_message
from modelcar.fsutil import atomic_write_bytes, exclusive
from modelcar.image import DEFAULT_PLATFORMS, DIGEST_RE
from modelcar.tarlayer import Member, is_safe_path, is_whiteout

log = logging.getLogger("modelcar")

LOCK_VERSION = 1
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
HEADER = "# modelcar lock file: written by `modelcar lock` and `modelcar build`; commit it, do not edit.\n"
# libyaml's parser and emitter, which every PyYAML wheel ships: a build reads the lock four times and
# writes it twice, and a lock of 30 models (58 KB) takes 75 ms to read and 43 ms to write in pure
# Python, 10 and 11 ms with libyaml. Both emitters give the same bytes (test_lock).
YAML_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
YAML_DUMPER: type[yaml.SafeDumper] = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LockedFile(_Strict):
    path: str
    size: int = Field(ge=0)
    sha256: str

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        # joined to the HF cache, a layer's root, a mirror's snapshot: a lock edited in a pull
        # request must not name a file outside them
        if not is_safe_path(v):
            raise ValueError(f"{v!r} must be a relative path inside the model (no '..', '.' or empty part)")
        return v

    @field_validator("sha256")
    @classmethod
    def _sha(cls, v: str) -> str:
        if not SHA256_RE.fullmatch(v):
            raise ValueError("must be 64 lowercase hex characters")
        return v

    @property
    def member(self) -> Member:
        """The file as a layer member: what a tar entry and a check of its bytes need."""
        return Member(self.path, self.size, self.sha256)


class LockedImage(_Strict):
    digest: str | None = None
    repository: str | None = None
    base: str | None = None  # the catalog's `base:` the image was built on (a new base: a new image)
    platforms: list[str] | None = None  # the catalog's `platforms:` it was built for, when it names them
    tags: list[str] | None = None  # the catalog's tags it was given (a new tag: a push to make)

    @field_validator("digest")
    @classmethod
    def _digest(cls, v: str | None) -> str | None:
        # what patches pin: a hand edit or a merge that broke it must not reach an overlay
        if v is not None and not DIGEST_RE.fullmatch(v):
            raise ValueError("must be sha256: and 64 lowercase hex characters")
        return v


class LockedModel(_Strict):
    source: str
    revision: str | None = None
    commit: str
    include: list[str] = Field(default_factory=list)
    exclude: list[str] = Field(default_factory=list)
    files: list[LockedFile]
    image: LockedImage | None = None
    # The image this entry replaced (another commit's, or one built on another base), its digest
    # and repository, until the entry's own image is pushed: the layers of the files that did not
    # change are reused from it. A digest the lock records, not a tag a registry answers: what a
    # tag names is whatever whoever can push there put there, and its layers' claims are not taken.
    earlier: LockedImage | None = None

    @field_validator("revision")
    @classmethod
    def _revision(cls, v: str | None) -> str | None:
        return None if v is None else check_revision(v)  # it names a file under the HF cache's refs/

    @field_validator("commit")
    @classmethod
    def _commit(cls, v: str) -> str:
        if not COMMIT_RE.fullmatch(v):  # a git commit, or a local model's content id
            raise ValueError("must be a full commit: 40 lowercase hex characters")
        return v

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def members(self) -> list[Member]:
        return [f.member for f in self.files]

    @property
    def repository(self) -> str | None:
        """Where the image was last pushed (None: built into a layout only, or not built)."""
        return self.image.repository if self.image else None

    @property
    def reusable(self) -> list[LockedImage]:
        """The images whose layers a build of this entry may reuse: its own, and the one its pin
        replaced while its own is in no registry yet (built into a developer's layout, then pushed
        from a fresh CI runner)."""
        return [i for i in (self.image, self.earlier) if i is not None and i.digest is not None]

    def repinned(self, new: LockedModel) -> LockedModel:
        """`new`, an entry that replaces this one without its image (another commit, another base),
        remembering the image to reuse the files' layers from: a pushed one where there is one."""
        before = sorted(self.reusable, key=lambda i: i.repository is None)
        if new.image is not None or not before:
            return new
        kept = LockedImage(digest=before[0].digest, repository=before[0].repository)
        return new.model_copy(update={"earlier": kept})


class Lock(_Strict):
    version: int = LOCK_VERSION
    models: dict[str, LockedModel] = Field(default_factory=dict)


def source_of(spec: ModelSpec, catalog: Catalog) -> str:
    """The source URI as recorded in the lock: machine-independent, relative to the catalog."""
    if spec.hf is not None:
        return f"hf://{spec.hf}"
    assert spec.path is not None
    local = (catalog.root / spec.path).resolve()
    try:
        rel = local.relative_to(catalog.root.resolve())
    except ValueError:
        rel = Path(spec.path)  # outside the catalog's tree: keep what the user wrote
    return f"path://{rel.as_posix()}"


def is_current(entry: LockedModel, spec: ModelSpec, catalog: Catalog) -> bool:
    """Whether a locked entry still answers the catalog entry (same source, revision, selection),
    and lists no file that `lock` refuses now (a whiteout name, from an older modelcar or a hand
    edit: locked again, which says what to exclude, while the lock's other models work on)."""
    return (
        entry.source == source_of(spec, catalog)
        and entry.revision == (spec.hf_revision if spec.hf else None)
        and entry.include == sorted(set(spec.include))
        and entry.exclude == sorted(set(spec.exclude))
        and not any(is_whiteout(f.path) for f in entry.files)
    )


def pins_its_revision(entry: LockedModel, spec: ModelSpec) -> bool:
    """Whether the catalog names the very commit the entry pins: `--update` has nothing to move
    there (a commit's files never change), so it asks the Hub nothing for it."""
    return spec.hf is not None and spec.hf_revision == entry.commit


def pinned_digest(entry: LockedModel | None, name: str, lock_file: Path) -> str:
    """The image digest a model's lock entry pins; an error saying how to get one where it has none."""
    if entry is None:
        raise NotLocked(f"{lock_file}: {name} is not locked: run `modelcar build {name}`")
    if entry.image is None or entry.image.digest is None:
        raise NotBuilt(f"{lock_file}: {name}: no image digest in the lock: run `modelcar build {name}`")
    return entry.image.digest


def image_tags(spec: ModelSpec, entry: LockedModel) -> list[str]:
    """The commit's first 12 hex, then the catalog's tags."""
    return [entry.commit[:12], *(t for t in spec.tags if t != entry.commit[:12])]


SCRATCH = "scratch"  # the base of an image with none, as a Containerfile says it (`FROM scratch`)


def recorded_image(
    old: LockedImage | None, digest: str, repository: str | None, spec: ModelSpec, *, built: bool
) -> LockedImage:
    """The lock's image entry after the image with `digest` landed in a store, for `spec`.

    `built`: this run made the image from `spec`, so its base is the catalog's; a copy (`modelcar
    push`) knows of the image only what was recorded. A registry push records where it went and
    the tags it gave; a local build keeps what a push recorded only while it still names the same
    image (the registry has those tags, not the catalog's new ones).
    """
    same = old is not None and old.digest == digest
    known = old if same else None
    base = (spec.base or SCRATCH) if built else known.base if known is not None else None
    platforms = spec.platforms if built else known.platforms if known is not None else None
    if repository is not None:
        tags: list[str] | None = sorted(set(spec.tags))
    else:
        repository = known.repository if known is not None else None
        tags = known.tags if known is not None else None
    return LockedImage(digest=digest, repository=repository, base=base, platforms=platforms, tags=tags)


def built_as_asked(image: LockedImage, spec: ModelSpec) -> bool:
    """Whether a recorded image is known to be built on the base and for the platforms the catalog
    gives the model now (both are recorded together, by a build). Without a base, no platforms
    are the default ones: a catalog that names them is asking for the same image."""
    if image.base != (spec.base or SCRATCH):
        return False
    if spec.base:
        return image.platforms == spec.platforms
    return set(image.platforms or DEFAULT_PLATFORMS) == set(spec.platforms or DEFAULT_PLATFORMS)


def built_otherwise(image: LockedImage, spec: ModelSpec) -> bool:
    """Whether a recorded image is known to be built on another base or for other platforms than
    the catalog's now: not the model's image any more. A lock from before bases were recorded
    says nothing (it keeps its image; `image_answers` sends the model to a build that records it)."""
    return image.base is not None and not built_as_asked(image, spec)


def not_servable(image: LockedImage, spec: ModelSpec) -> bool:
    """Whether a recorded image cannot be pinned for the catalog entry: built on another base or
    for other platforms, or, where the catalog names a base or platforms, not known to be built
    on them (a lock or a worker's result from before bases were recorded): a pod would run
    another base (without the shell the overlay's mode needs) or lack its nodes' platform."""
    return built_otherwise(image, spec) or (bool(spec.base or spec.platforms) and not built_as_asked(image, spec))


def kept_image(image: LockedImage | None, spec: ModelSpec) -> LockedImage | None:
    """The image an entry keeps for the same files: none when it is known to be built otherwise."""
    return None if image is not None and built_otherwise(image, spec) else image


def image_answers(image: LockedImage, spec: ModelSpec) -> bool:
    """Whether a recorded image is known to be the one the catalog entry asks for now: on its base,
    for its platforms, and pushed with all its tags (its files: `is_current`). What is not recorded
    (a lock from before, an image built but not pushed) does not answer: `plan --changed-only`
    lists the model, and its build -- a no-op push when nothing changed -- records it."""
    return built_as_asked(image, spec) and image.tags is not None and set(spec.tags) <= set(image.tags)


def dump_lock(lock: Lock) -> str:
    """Serialize deterministically: the same lock always gives the same bytes."""
    return _dumped(lock)[0]


def _dumped(lock: Lock) -> tuple[str, dict[str, Any]]:
    """dump_lock's text, and the data it is the YAML of."""
    models = {}
    for name in sorted(lock.models):
        entry = lock.models[name]
        data = entry.model_dump(exclude_none=True)
        data["files"] = sorted(data["files"], key=lambda f: f["path"])
        data["include"] = sorted(data["include"])
        data["exclude"] = sorted(data["exclude"])
        if not data.get("image"):
            data.pop("image", None)
        if data.get("image", {}).get("repository") or not data.get("earlier"):
            data.pop("earlier", None)  # the entry's own image, pushed, is the one to reuse layers from
        models[name] = data
    doc = {"version": lock.version, "models": models}
    body = yaml.dump(
        doc, Dumper=YAML_DUMPER, sort_keys=True, default_flow_style=False, allow_unicode=True, width=1 << 16
    )
    return HEADER + body, doc


def read_lock(path: Path) -> Lock:
    """The lock at `path`, or an empty one when it does not exist yet."""
    if not path.exists():
        return Lock()
    text = path.read_text(encoding="utf-8", errors="replace")
    if re.search(r"^(<{7}|>{7}) ", text, re.MULTILINE):
        raise LockError(
            f"{path}: git merge conflict markers: take either side (`git checkout --ours {path.name}` or "
            "--theirs), then run `modelcar lock` to fold the merged catalog in again"
        )
    # Deleting a lock re-pins every model (a `revision: main` moves to the branch's head) and drops
    # every digest: the advice is to mend it or take it back from git.
    mend = f"fix it, or take it back from git (`git checkout -- {path.name}`): deleting it re-pins every model"
    raw = _parsed(text, path, mend)
    if raw is None:
        return Lock()
    version = raw.get("version") if isinstance(raw, dict) else None
    if isinstance(version, int) and version > LOCK_VERSION:
        raise LockError(
            f"{path}: lock version {version} is newer than this modelcar reads ({LOCK_VERSION}): "
            "upgrade modelcar (the lock holds the pins: keep it)"
        )
    try:
        lock = Lock.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        if first["type"] == "extra_forbidden":
            raise LockError(
                f"{path}: {loc}: a field this modelcar does not know: a typo (fix it), or a lock written by a "
                "newer modelcar (use that version or a later one; the lock holds the pins: keep it)"
            ) from None
        message = first["msg"].removeprefix("Value error, ")  # pydantic's prefix for a validator's own words
        raise LockError(f"{path}: {loc}: {message}; {mend}") from None
    if lock.version != LOCK_VERSION:
        raise LockError(f"{path}: lock version {lock.version} is not supported (expected {LOCK_VERSION})")
    return lock


def same_pin(a: LockedModel, b: LockedModel) -> bool:
    """Whether two entries pin the same files: an image made for one is the other's."""
    return a.source == b.source and a.commit == b.commit and a.files == b.files


class NotRecorded(ModelcarError):
    """An image a run made for a pin the lock holds no more: another run re-pinned the model (or
    the catalog lost it) while this one built. `refused`: each model's line."""

    def __init__(self, message: str, refused: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.refused = dict(refused or {})


@dataclass(frozen=True)
class Pinned:
    """A run's new pin for a model, applied to the entry the lock holds when it is written: an
    image recorded meanwhile for the same pin (a build that ran beside a `lock --update`) stays."""

    spec: ModelSpec
    entry: LockedModel  # its image: the one the run read for this pin, if any

    def apply(self, current: LockedModel | None) -> LockedModel:
        if current is not None and same_pin(current, self.entry):
            return self.entry.model_copy(update={"image": kept_image(current.image, self.spec)})
        return self.entry


@dataclass(frozen=True)
class Recorded:
    """An image a run put in a store, applied to the entry the lock holds when it is written:
    what another run recorded of the same image meanwhile (the repository a push went to) is
    kept, as `recorded_image` keeps it; a pin that moved meanwhile refuses it (NotRecorded)."""

    spec: ModelSpec
    entry: LockedModel  # the entry the image was made from
    digest: str
    repository: str | None
    built: bool

    def apply(self, current: LockedModel | None) -> LockedModel:
        if current is None or not same_pin(current, self.entry):
            now = f"pins commit {current.commit[:12]} now" if current is not None else "lists it no more"
            raise NotRecorded(
                f"{self.spec.name}: the lock {now}, another run's doing while this one made the image of commit "
                f"{self.entry.commit[:12]} ({self.digest}): that image is not recorded; run again"
            )
        now_digest = current.image.digest if current.image else None
        if not self.built and now_digest != self.digest:  # a copy of what the lock named when it began
            now = f"names image {now_digest} now (built again" if now_digest else "names no image now (dropped"
            raise NotRecorded(
                f"{self.spec.name}: the lock {now} while this run copied {self.digest}): the copy is not recorded; "
                "run again"
            )
        return current.model_copy(update={"image": self.image_for(current)})

    def image_for(self, entry: LockedModel) -> LockedImage:
        """The image `entry` records once this one is recorded in it."""
        return recorded_image(entry.image, self.digest, self.repository, self.spec, built=self.built)


def save_entries(catalog: Catalog, entries: Mapping[str, LockedModel | Pinned | Recorded]) -> tuple[Lock, bool]:
    """Fold these entries into the lock on disk, as it is now, and drop models the catalog lost.

    Re-reading under a lock (held on the catalog file) lets two builds of different models from
    one checkout both land their pins and digests instead of the last writer winning; a Pinned or
    Recorded entry is applied to the entry read then, not to the one its run read at its start.
    Recorded images whose pin moved meanwhile are left out: NotRecorded, once the rest is written.
    """
    refused: dict[str, str] = {}
    with exclusive(catalog.file):
        lock = read_lock(catalog.lock_file)
        folded: dict[str, LockedModel] = {}
        for name, entry in entries.items():
            try:
                folded[name] = entry if isinstance(entry, LockedModel) else entry.apply(lock.models.get(name))
            except NotRecorded as exc:
                refused[name] = str(exc)
        lock = fold_entries(lock, catalog, folded)
        changed = write_lock(catalog.lock_file, lock)
    if refused:
        raise NotRecorded("\n".join(refused.values()), refused)
    return lock, changed


def record_images(catalog: Catalog, entries: Mapping[str, Recorded], done: str, again: str) -> dict[str, str]:
    """save_entries for images a run put in a store; when the lock cannot be written or holds
    another pin now, the line that says so for each model not recorded, to report with the
    models' failures: the images are there (`done`: "written", "pushed"), what to fix, and that
    running `again` redoes nothing."""
    try:
        save_entries(catalog, entries)
    except NotRecorded as exc:
        return exc.refused
    except OSError as exc:
        line = (
            f"{os_error_message(exc)}: the images were {done}, {catalog.lock_file} does not record them: "
            f"fix that and {again}"
        )
        return dict.fromkeys(entries, line)
    return {}


def renamed_pins(catalog: Catalog, lock: Lock) -> dict[str, tuple[str, LockedModel]]:
    """Models renamed in the catalog, not locked under the new name yet: new name -> (old name,
    its entry), whose pin the new name keeps. Only where the entry the catalog lost and the new
    model match one to one by source and revision: otherwise which entry is which model's is a
    guess, and the new name is locked afresh."""
    listed = {m.name for m in catalog.models}
    lost: dict[tuple[str, str | None], list[str]] = {}
    for name, entry in lock.models.items():
        if name not in listed:
            lost.setdefault((entry.source, entry.revision), []).append(name)
    new: dict[tuple[str, str | None], list[str]] = {}
    for spec in catalog.models:
        if spec.hf is not None and spec.name not in lock.models:
            new.setdefault((source_of(spec, catalog), spec.hf_revision), []).append(spec.name)
    return {
        names[0]: (lost[key][0], lock.models[lost[key][0]])
        for key, names in new.items()
        if len(names) == 1 and len(lost.get(key, [])) == 1
    }


def fold_entries(lock: Lock, catalog: Catalog, entries: dict[str, LockedModel]) -> Lock:
    """`lock` (changed in place) with these entries and without the models the catalog lost, but
    for a renamed model's old entry until the new name is locked (a run locking other models
    first would have lost its pin)."""
    lock.models.update(entries)
    known = {m.name for m in catalog.models} | {old for old, _ in renamed_pins(catalog, lock).values()}
    if stale := [n for n in lock.models if n not in known]:
        log.info("%s: %s no longer in %s: its pin dropped", catalog.lock_file, ", ".join(stale), catalog.file.name)
    for name in stale:
        del lock.models[name]
    return lock


def write_lock(path: Path, lock: Lock) -> bool:
    """Write the lock atomically; return whether its bytes changed. Not even serialized where the
    file holds what this process wrote or found to be `dump_lock`'s text of this very lock."""
    try:
        existing = path.read_bytes().decode("utf-8")  # as it is: a CRLF file is not the text we write
    except (FileNotFoundError, UnicodeDecodeError):
        existing = None
    if existing is not None and (known := _PARSED.get(existing)) is not None and known[1]:
        with suppress(ValidationError):
            if Lock.model_validate(known[0]) == lock:
                return False
    text, data = _dumped(lock)
    if existing != text:
        atomic_write_bytes(path, text.encode())
    _remember(text, data, canonical=True)
    return existing != text


# A run reads its lock several times (at its start, then under the catalog's lock before each
# write) and writes it up to twice; parsing a lock of a model with thousands of files takes tens of
# milliseconds (the YAML, not the validation). The same text is parsed once per process: text ->
# (the YAML's data, whether the text is dump_lock's of it). Entries are made from the data each time.
_PARSED: dict[str, tuple[Any, bool]] = {}
_PARSED_LOCK = threading.Lock()
_PARSED_KEPT = 4  # texts: a run's lock, before and after its writes


def _parsed(text: str, path: Path, mend: str) -> Any:
    if (known := _PARSED.get(text)) is not None:
        return known[0]
    try:
        raw = yaml.load(text, Loader=YAML_LOADER)
    except yaml.YAMLError as exc:
        raise LockError(f"{yaml_problem(path, exc)}; {mend}") from None
    _remember(text, raw, canonical=False)
    return raw


def _remember(text: str, data: Any, *, canonical: bool) -> None:
    with _PARSED_LOCK:
        _PARSED[text] = (data, canonical or (text in _PARSED and _PARSED[text][1]))
        while len(_PARSED) > _PARSED_KEPT:
            del _PARSED[next(iter(_PARSED))]
