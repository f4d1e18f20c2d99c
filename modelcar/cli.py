"""The `modelcar` command line: parse arguments, call the library, print the result.

stdout carries results (one JSON document with `--json`); logs, warnings and progress go to
stderr. Exit codes: 0 ok, 1 failure, 2 bad input.
"""

from __future__ import annotations

import functools
import gc
import json
import logging
import os
import re
import shlex
import signal
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer

from modelcar import __version__, api
from modelcar.api import Remote
from modelcar.catalog import load_catalog
from modelcar.describe import human_size, plural
from modelcar.errors import (
    InputError,
    ModelcarError,
    PartialFailure,
    error_message,
    os_error_message,
    printable,
    without_credentials,
)
from modelcar.image import platform_name
from modelcar.plan import (
    POD_UID,
    dump_k8s_job,
    github_matrix,
    k8s_job,
    model_at,
)
from modelcar.progress import Progress
from modelcar.retry import RetryPolicy
from modelcar.stores import DEFAULT_MAX_LAYER, registry_prefix_problem

# httpx and huggingface_hub, and the modules that use them, are imported by the command that runs
# (inside api's functions): start-up time is most of a no-op or incremental build.
if TYPE_CHECKING:
    from modelcar.build import ModelResult
    from modelcar.copy import CopyResult

app = typer.Typer(
    name="modelcar",
    help="Pre-stage Hugging Face models as reproducible OCI modelcar images for vLLM on Kubernetes.\n\n"
    "Exit codes: 0 ok; 1 a failure (a model that failed, verify's mismatch, patch --check's drift); 2 bad "
    "input (catalog, lock, arguments; a Hub repo or revision not there; a path: model changed since "
    "the lock); 130/143 interrupted (Ctrl-C, SIGTERM); 141 stdout closed early.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Rich's panels (80 columns of box drawing around a usage error) for a person at a terminal only;
    # a CI log gets click's plain `Error: ...` line, whole and greppable.
    rich_markup_mode="rich" if sys.stderr is not None and sys.stderr.isatty() else None,
)
log = logging.getLogger("modelcar")
R = TypeVar("R")

CatalogOpt = Annotated[
    Path, typer.Option("--catalog", "-c", help="Catalog file; the lock is beside it with the suffix .lock.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout; logs go to stderr.")]
ModelsArg = Annotated[
    list[str] | None, typer.Argument(metavar="MODEL", help="Model names from the catalog (default: all).")
]
MaxRetriesOpt = Annotated[
    int,
    typer.Option("--max-retries", min=0, help="Retries per remote call (Hub or registry) on 429/5xx/network errors."),
]
DeadlineOpt = Annotated[
    float,
    typer.Option(
        "--retry-deadline", min=1, help="Seconds one remote call (Hub or registry) may spend retrying, waits included."
    ),
]
HfWorkersOpt = Annotated[int, typer.Option("--hf-workers", min=1, help="Hub requests and downloads at once.")]
HfLargeOpt = Annotated[
    int,
    typer.Option(
        "--hf-large-workers",
        min=1,
        help="Of those, weight files (16 MiB or more) at once, in layer order, so uploads start early; "
        "raise it when the Hub connection, not this machine, is the bottleneck.",
    ),
]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging on stderr.")]
RegistryOpt = Annotated[
    str | None, typer.Option("--registry", help="Registry repository prefix HOST[:PORT]/PATH (default: the catalog's).")
]
InsecureOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--insecure-registry",
        metavar="HOST[:PORT]",
        help="Use plain HTTP for this registry, named exactly as in the store, port included (repeatable; "
        "also MODELCAR_INSECURE_REGISTRIES). "
        "Loopback hosts always use plain HTTP.",
    ),
]
CaFileOpt = Annotated[Path | None, typer.Option("--ca-file", help="PEM CA bundle to trust besides the system CAs.")]
ChunkOpt = Annotated[
    int,
    typer.Option(
        "--upload-chunk-size",
        min=0,
        help="Upload blobs in PATCH chunks of this many bytes (GHCR: at most 4194304); "
        "0 streams each blob in one request.",
    ),
]
MaxLayerOpt = Annotated[
    int,
    typer.Option("--max-layer-size", min=0, help="Refuse layers over this many bytes before uploading (0: no limit)."),
]
JobsOpt = Annotated[int, typer.Option("--jobs", "-j", min=1, help="Blobs written or uploaded in parallel.")]


class _Formatter(logging.Formatter):
    """Log lines with no URL's credentials in them (a library's message may quote HF_ENDPOINT),
    each line of a message of several (a library's, a traceback) with the logger's prefix: a CI
    log grepped for `modelcar:` or `huggingface_hub:` gets all of an event."""

    def __init__(self, prefix: str) -> None:
        super().__init__(f"{prefix}%(message)s")
        self.prefix = prefix

    def format(self, record: logging.LogRecord) -> str:
        text = printable(_shown(super().format(record)))
        return "\n".join(line if i == 0 else self.prefix + line for i, line in enumerate(text.splitlines()))


def _warning_to_log(message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> None:
    """A library's warning (huggingface_hub's deprecations: a FutureWarning for an environment
    variable a CI sets) as one log line, not Python's two lines with a source path."""
    log.warning("%s: %s", category.__name__, message)


# what a stopped run leaves is whole (images, lock, overlays): the same command goes on from there
INTERRUPTED = "interrupted: nothing is half-written; run the same command again to go on"


def _setup_logging(verbose: bool) -> None:
    """Our logs and huggingface_hub's (its rate-limit waits; with -v, each request it sends) on the
    current stderr, one prefix each, and Python's warnings as log lines."""

    def take(name: str, level: int) -> None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_Formatter(f"{name}: "))
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.propagate = False
        logger.setLevel(level)

    take("modelcar", logging.DEBUG if verbose else logging.INFO)
    warnings.showwarning = _warning_to_log  # before huggingface_hub is imported: it warns as it loads
    try:
        from huggingface_hub.utils import logging as hf_logging
    except ValueError as exc:  # its settings are read as it loads: a malformed HF_ENDPOINT raised here
        from modelcar.hub import hf_endpoint

        hf_endpoint()  # names the endpoint's problem, if that is it
        raise InputError(f"huggingface_hub cannot start here ({exc}): check the HF_* variables") from None

    hf_logging.get_logger()  # let huggingface_hub set up its logger first, then take it over
    hf_level = logging.getLevelName(os.environ.get("HF_HUB_VERBOSITY", "warning").upper())  # its own setting
    take("huggingface_hub", logging.DEBUG if verbose else hf_level if isinstance(hf_level, int) else logging.WARNING)


def _run(fn: Callable[[], None], verbose: bool, as_json: bool, catalog: Path) -> None:
    """Run a command's body: an error is one line on stderr and its exit code; with `--json`, a
    command that fails before its own document also prints `{"error": ...}`, so a reader of
    stdout always gets one JSON document."""
    _printed.clear()
    _json_run[:] = [as_json]
    _catalog_option.clear()
    if catalog != Path("catalog.yaml"):
        _catalog_option.append(f"-c {shlex.quote(str(catalog))}")
    try:
        _setup_logging(verbose)
        fn()
    except ModelcarError as exc:
        _failed(str(exc), exc.exit_code, as_json)
    except KeyboardInterrupt:
        _failed(INTERRUPTED, 128 + (_signalled[0] if _signalled else signal.SIGINT), as_json, prefix="")
    except OSError as exc:  # the file system said no (a path that is a file, no space, no permission)
        _failed(os_error_message(exc), 1, as_json)
    except typer.Exit:  # the command's own exit code
        raise
    except Exception as exc:  # a bug: its traceback for the report, and still one error line and document
        log.error("%s", "".join(traceback.format_exception(exc)).rstrip())
        what = f"{type(exc).__name__}: {exc}".splitlines()[0]
        _failed(f"unexpected {what} (a modelcar bug: please report it, with the traceback above)", 1, as_json)


def _echo(text: str, err: bool = False) -> None:
    """A line for a person: what a store or a server put in it (a tar path, an annotation, a
    registry's message) cannot steer the terminal (errors.printable)."""
    typer.echo(printable(with_catalog(text)), err=err)


_catalog_option: list[str] = []  # `-c PATH` of this run, when its catalog is not ./catalog.yaml


@functools.cache
def _hint() -> re.Pattern[str]:
    """A command a hint names (`modelcar build tiny`), as the library words it: with the default
    catalog; one of this app's commands, each that takes `-c`. Not one named as what wrote a file
    ("# Written by `modelcar patch` from ...", quoted in an error; "as `modelcar build --index N
    --result FILE` writes")."""
    commands = "|".join(c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands if c.callback)
    return re.compile(rf"(?<![Bb]y )(?<!as )`(modelcar (?:{commands})\b[^`]*)`")


def _shown(text: str) -> str:
    """An error's words as printed or put in a JSON document: no credentials a URL in them carried
    (a registry's or a Hub's words are quoted in them), hints with this run's catalog."""
    return with_catalog(without_credentials(text))


def with_catalog(text: str) -> str:
    """Each command a hint says to run next, with this run's catalog where it is not the default:
    `run modelcar build tiny`, run from the same directory, found no catalog."""
    if not _catalog_option:
        return text
    option = _catalog_option[0]
    return _hint().sub(lambda m: m[0] if m[1].endswith(option) else f"`{m[1]} {option}`", text)


def _failed(message: str, code: int, as_json: bool, prefix: str = "error: ") -> NoReturn:
    message = _shown(message)
    # every line of it prefixed (a catalog's several problems), for a reader grepping a CI log
    _echo("\n".join(f"{prefix}{line}" for line in message.splitlines() or [""]), err=True)
    if as_json:  # unless the command printed its own (_print_json prints one document a run)
        _print_json({"error": message})
    raise typer.Exit(code) from None


def _remote(
    max_retries: int,
    deadline: float,
    *,
    insecure: list[str] | None = None,
    ca_file: Path | None = None,
    chunk: int = 0,
    max_layer_size: int = DEFAULT_MAX_LAYER,
    hf_workers: int = 8,
    hf_large_workers: int = 2,
) -> Remote:
    return Remote(
        RetryPolicy(max_retries=max_retries, deadline=deadline),
        tuple(insecure or ()),
        ca_file,
        chunk,
        max_layer_size,
        hf_workers,
        hf_large_workers,
    )


_printed: list[bool] = []  # a JSON document went to stdout in this run
_json_run: list[bool] = []  # this run prints one (--json)
_print_lock = threading.Lock()


def _print_json(doc: Any) -> None:
    with _print_lock:  # one document, whichever of the main thread and the grace timer prints it
        if _printed:
            return
        sys.stdout.write(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        _printed.append(True)


def _print_build(results: list[ModelResult], dry_run: bool) -> None:
    for r in results:
        if dry_run:
            _echo(f"{r.name}  {r.source}  {r.commit[:12]}  {r.files} files  {human_size(r.bytes)}")
            for layer in r.layers:
                _echo(f"  layer {human_size(layer.plan.size):>10}  {layer.plan.description}")
        else:
            _echo(f"{r.name}  {r.digest or 'FAILED'}  {plural(len(r.layers), 'layer')}  {human_size(r.bytes)}")
    if dry_run:
        _echo("dry run: no image and no lock written")


def _step_summary(results: list[ModelResult], dry_run: bool) -> None:
    """A Markdown table in the GitHub Actions job summary, when running there."""
    path = os.environ.get("GITHUB_STEP_SUMMARY")
    if not path or dry_run:
        return
    rows = [
        "| model | commit | digest | bytes | seconds | layers written / already there |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        written = len(r.layers) - r.reused
        rows.append(
            f"| {r.name} | `{r.commit[:12]}` | `{r.digest or 'failed'}` | {human_size(r.bytes)} | {r.seconds:.1f} "
            f"| {written} / {r.reused} |"
        )
    try:
        with open(path, "a", encoding="utf-8") as out:
            out.write("\n".join(["### modelcar build", "", *rows, ""]) + "\n")
    except OSError as exc:  # a nicety: a path not mounted into the job's container fails no build
        log.warning("GITHUB_STEP_SUMMARY: no job summary written: %s", os_error_message(exc))


@app.command()
def lock(
    models: ModelsArg = None,
    update: Annotated[bool, typer.Option("--update", help="Re-resolve revisions of pinned models too.")] = False,
    catalog: CatalogOpt = Path("catalog.yaml"),
    as_json: JsonOpt = False,
    max_retries: MaxRetriesOpt = 8,
    retry_deadline: DeadlineOpt = 900.0,
    hf_workers: HfWorkersOpt = 8,
    verbose: VerboseOpt = False,
) -> None:
    """Pin each model to a commit and list its files (size, sha256) in the lock. Downloads no weights."""

    def go() -> None:
        cat = load_catalog(catalog)
        result = api.lock(
            cat, models, update=update, remote=_remote(max_retries, retry_deadline, hf_workers=hf_workers)
        )
        entries = {n: result.lock.models[n] for n in (m.name for m in cat.select(models))}
        if as_json:
            _print_json(
                {
                    "lock": str(cat.lock_file),
                    "changed": result.changed,
                    "models": [
                        {
                            "name": n,
                            "source": e.source,
                            "commit": e.commit,
                            "files": len(e.files),
                            "bytes": e.total_bytes,
                            "locked": n in result.locked,  # resolved again in this run
                            "moved": n in result.moved,  # to a new pin (commit or files), or pinned anew
                        }
                        for n, e in entries.items()
                    ],
                }
            )
            return
        for n, e in entries.items():
            state = "locked" if n in result.moved else "pinned"  # re-resolved to the same pin: pinned
            _echo(f"{n}  {e.source}  {e.commit[:12]}  {len(e.files)} files  {human_size(e.total_bytes)}  {state}")
        _echo(f"{cat.lock_file}: {'updated' if result.changed else 'unchanged'}")

    _run(go, verbose, as_json, catalog)


@app.command()
def build(
    models: ModelsArg = None,
    catalog: CatalogOpt = Path("catalog.yaml"),
    layout: Annotated[
        Path | None,
        typer.Option("--layout", help="OCI layout directory (default: .modelcar/oci beside the catalog)."),
    ] = None,
    push: Annotated[
        bool, typer.Option("--push", help="Push straight to the registry instead of writing the layout.")
    ] = False,
    registry: Annotated[
        str | None,
        typer.Option(
            "--registry", help="With --push: the registry repository prefix HOST[:PORT]/PATH (default: the catalog's)."
        ),
    ] = None,
    jobs: JobsOpt = 4,
    update: Annotated[
        bool,
        typer.Option("--update", help="Re-resolve revisions of pinned models first, as `lock --update` does."),
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Print what would be built; write no image and no lock (a model not locked yet is still "
            "resolved: its small files are fetched to hash them).",
        ),
    ] = False,
    as_json: JsonOpt = False,
    max_retries: MaxRetriesOpt = 8,
    retry_deadline: DeadlineOpt = 900.0,
    hf_workers: HfWorkersOpt = 8,
    hf_large_workers: HfLargeOpt = 2,
    insecure_registry: InsecureOpt = None,
    ca_file: CaFileOpt = None,
    upload_chunk_size: ChunkOpt = 0,
    max_layer_size: MaxLayerOpt = DEFAULT_MAX_LAYER,
    index: Annotated[
        int | None,
        typer.Option(
            "--index",
            min=0,
            metavar="N",
            help="Build the catalog's model at index N, counted from 0 (a CI worker of `modelcar plan`); "
            "a MODEL with it must be that one.",
        ),
    ] = None,
    result: Annotated[
        Path | None,
        typer.Option("--result", help="Write the model's lock entry here, for `modelcar merge`; the lock stays as is."),
    ] = None,
    no_cache: Annotated[
        bool,
        typer.Option(
            "--no-cache",
            help="Trust nothing remembered: reuse no earlier layer, read and check every file, make every layer "
            "anew (rebuilds an image `modelcar verify` found damaged; the layer cache is written afresh).",
        ),
    ] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Lock if needed, download each snapshot once, and build each model's image into the OCI layout
    (or, with --push, stream it straight to the registry)."""

    def go() -> None:
        from modelcar.build import BuildFailed

        cat = load_catalog(catalog)
        names = models
        if index is not None:
            # A MODEL with it is what the plan said is there: a catalog changed since (a Job's
            # ConfigMap made anew while its pods start) builds another model, said, not done.
            names = [model_at(cat, index).name]
            if models and models != names:
                raise InputError(
                    f"{cat.file}: --index {index} is {names[0]!r} in this catalog, not {' '.join(models)!r}: "
                    "the catalog changed since the plan that named it; plan again"
                )
        remote = _remote(
            max_retries,
            retry_deadline,
            insecure=insecure_registry,
            ca_file=ca_file,
            chunk=upload_chunk_size,
            max_layer_size=max_layer_size,
            hf_workers=hf_workers,
            hf_large_workers=hf_large_workers,
        )
        failed: BuildFailed | None = None
        try:
            results = api.build(
                cat,
                names,
                push=push,
                registry=registry,
                layout=layout,
                jobs=jobs,
                update=update,
                no_cache=no_cache,
                dry_run=dry_run,
                result_file=result,
                remote=remote,
                progress=Progress(),
            )
            if result is not None:
                log.info("%s: result written to %s", results[0].name, result)
        except BuildFailed as exc:  # report every model, then fail
            failed, results = exc, exc.results
        except (ModelcarError, OSError) as exc:  # nothing built (the lock step failed): say so, then fail
            if as_json:
                _print_json({"dryRun": dry_run, "models": [], "error": _shown(error_message(exc))})
            raise
        if as_json:  # `error`: why the run failed, also where no model did (the lock could not be written)
            built = [{**r.to_json(), **({"error": _shown(r.error)} if r.error else {})} for r in results]
            doc: dict[str, Any] = {"dryRun": dry_run, "models": built}
            _print_json({**doc, "error": _shown(error_message(failed))} if failed is not None else doc)
        else:
            _print_build(results, dry_run)
        _step_summary(results, dry_run)
        if failed is not None:
            raise failed

    _run(go, verbose, as_json, catalog)


LayoutOpt = Annotated[
    Path | None, typer.Option("--layout", help="OCI layout directory (default: .modelcar/oci beside the catalog).")
]
FromOpt = Annotated[
    str | None,
    typer.Option(
        "--from",
        help="Store to read from: HOST[:PORT]/PATH, oci:DIR or oci-archive:FILE.tar "
        "(default: the local layout when it has the image, else the registry the lock records).",
    ),
]


@app.command()
def push(
    models: ModelsArg = None,
    catalog: CatalogOpt = Path("catalog.yaml"),
    registry: RegistryOpt = None,
    layout: LayoutOpt = None,
    jobs: JobsOpt = 4,
    as_json: JsonOpt = False,
    max_retries: MaxRetriesOpt = 8,
    retry_deadline: DeadlineOpt = 900.0,
    insecure_registry: InsecureOpt = None,
    ca_file: CaFileOpt = None,
    upload_chunk_size: ChunkOpt = 0,
    max_layer_size: MaxLayerOpt = DEFAULT_MAX_LAYER,
    verbose: VerboseOpt = False,
) -> None:
    """Copy built images from the local OCI layout to the registry; record where they went in the lock."""

    def go() -> None:
        remote = _remote(
            max_retries,
            retry_deadline,
            insecure=insecure_registry,
            ca_file=ca_file,
            chunk=upload_chunk_size,
            max_layer_size=max_layer_size,
        )
        _report(
            lambda: api.push(
                catalog, models, registry=registry, layout=layout, jobs=jobs, remote=remote, progress=Progress()
            ),
            as_json,
            lambda r: r.to_json(),
            _copy_line,
        )

    _run(go, verbose, as_json, catalog)


def _copy_line(r: CopyResult) -> str:
    return f"{r.name}  {r.digest}  {r.source} -> {r.destination}"


def _report(
    run: Callable[[], list[R]],
    as_json: bool,
    doc: Callable[[R], Any],
    line: Callable[[R], str],
) -> None:
    """Print what a run of several models did, one line (or JSON object) each; where some failed
    (PartialFailure), what went through is printed all the same, with the error, and the run fails."""
    failed: PartialFailure[R] | None = None
    try:
        results = run()
    except PartialFailure as exc:
        failed, results = exc, exc.results
    if as_json:
        out: dict[str, Any] = {"models": [doc(r) for r in results]}
        if failed is not None:  # each failed model by name, as build's models[].error says it
            errors = failed.errors.items()
            out["failed"] = [{"name": name, "error": _shown(error_message(exc))} for name, exc in errors]
            out["error"] = _shown(str(failed))
        _print_json(out)
    else:
        for r in results:
            _echo(line(r))
    if failed is not None:
        raise failed


@app.command()
def mirror(
    to: Annotated[
        str,
        typer.Option(
            "--to",
            help="Destination: HOST[:PORT]/PATH, oci:DIR, oci-archive:FILE.tar, or hf-cache:DIR "
            "(a Hugging Face cache for servers that load by repo id offline; unpacked a model and a layer at "
            "a time: --jobs, --upload-chunk-size and --max-layer-size do not apply there).",
        ),
    ],
    models: ModelsArg = None,
    source: FromOpt = None,
    catalog: CatalogOpt = Path("catalog.yaml"),
    layout: LayoutOpt = None,
    jobs: JobsOpt = 4,
    as_json: JsonOpt = False,
    max_retries: MaxRetriesOpt = 8,
    retry_deadline: DeadlineOpt = 900.0,
    insecure_registry: InsecureOpt = None,
    ca_file: CaFileOpt = None,
    upload_chunk_size: ChunkOpt = 0,
    max_layer_size: MaxLayerOpt = DEFAULT_MAX_LAYER,
    no_cache: Annotated[
        bool,
        typer.Option(
            "--no-cache",
            help="oci: and oci-archive: destinations: trust nothing they hold, write every blob of each image "
            "again (mends what `modelcar verify --from` found damaged there).",
        ),
    ] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Copy every locked image by digest to another store (air-gap seeding); digests stay valid there."""

    def go() -> None:
        from modelcar.stores.spec import ARCHIVE, HF_CACHE, LAYOUT

        if no_cache and not to.startswith((LAYOUT, ARCHIVE)):
            # a registry keeps one copy of a blob and checks it as it takes it: none is sent again
            raise InputError(f"--no-cache: for oci:DIR and oci-archive:FILE destinations, not {to}")

        remote = _remote(
            max_retries,
            retry_deadline,
            insecure=insecure_registry,
            ca_file=ca_file,
            chunk=upload_chunk_size,
            max_layer_size=max_layer_size,
        )
        if to.startswith(HF_CACHE) and not to.removeprefix(HF_CACHE).strip():  # `hf-cache:$UNSET`
            raise InputError(f"{to!r}: name the directory: {HF_CACHE}DIR (not this one, by an empty name)")
        if to.startswith(HF_CACHE):
            _report(
                lambda: api.mirror_to_hf_cache(
                    catalog, Path(to.removeprefix(HF_CACHE)), models, source=source, layout=layout, remote=remote
                ),
                as_json,
                doc=lambda cached: cached.to_json(),
                line=lambda cached: f"{cached.name}  {cached.digest}  {cached.source} -> {cached.snapshot}",
            )
            return
        _report(
            lambda: api.mirror(
                catalog,
                to,
                models,
                source=source,
                layout=layout,
                jobs=jobs,
                remote=remote,
                progress=Progress(),
                no_cache=no_cache,
            ),
            as_json,
            lambda r: r.to_json(),
            _copy_line,
        )

    _run(go, verbose, as_json, catalog)


@app.command()
def verify(
    models: ModelsArg = None,
    source: FromOpt = None,
    catalog: CatalogOpt = Path("catalog.yaml"),
    layout: LayoutOpt = None,
    as_json: JsonOpt = False,
    max_retries: MaxRetriesOpt = 8,
    retry_deadline: DeadlineOpt = 900.0,
    insecure_registry: InsecureOpt = None,
    ca_file: CaFileOpt = None,
    jobs: Annotated[int, typer.Option("--jobs", "-j", min=1, help="Models, and blobs, read in parallel.")] = 4,
    verbose: VerboseOpt = False,
) -> None:
    """Read each image back from a store and check every digest and every file's sha256 against the lock."""

    def go() -> None:
        from modelcar.stores.spec import ARCHIVE, LAYOUT

        remote = _remote(max_retries, retry_deadline, insecure=insecure_registry, ca_file=ca_file)
        report = api.verify(
            catalog, models, source=source, layout=layout, jobs=jobs, remote=remote, progress=Progress()
        )
        failed = [name for name, v in report.items() if v.problems]
        failure = f"{len(failed)} of {plural(len(report), 'model')} failed the check: {', '.join(failed)}"
        if as_json:
            found = [
                {"name": n, "store": v.store, "problems": [_shown(p) for p in v.problems], "damaged": v.damaged}
                for n, v in report.items()
            ]
            _print_json({"ok": not failed, "models": found, **({"error": failure} if failed else {})})
            for name, v in report.items():  # a CI log that keeps stderr only says why, too
                for problem in v.problems:
                    log.error("%s: %s", name, problem)
        else:
            for name, v in report.items():
                _echo(f"{name}  ok" if not v.problems else f"{name}  FAILED  {v.store or ''}".rstrip())
                for problem in v.problems:
                    _echo(f"  {problem}")
        if failed:
            # an image read and found wrong; one never built or found nowhere says itself what to run
            damaged = [name for name, v in report.items() if v.damaged]
            if source is None and damaged:
                log.warning(
                    "to rebuild from checked files, trusting nothing remembered: `modelcar build --no-cache %s`"
                    " (with --push for an image in a registry)",
                    " ".join(damaged),
                )
            elif damaged and source is not None and source.startswith((LAYOUT, ARCHIVE)):
                log.warning(
                    "to write it again from where the lock says the image is: `modelcar mirror --to %s --no-cache %s`",
                    source,
                    " ".join(damaged),
                )
            _echo(f"error: {failure}", err=True)
            # 2 where each is the catalog's or the lock's to change (as every other command says it)
            raise typer.Exit(2 if all(report[name].input_error for name in failed) else 1)

    _run(go, verbose, as_json, catalog)


@app.command()
def inspect(
    ref: Annotated[
        str,
        typer.Argument(
            metavar="REF",
            help="A model of the catalog (its locked image, where verify would read it), oci:DIR:NAME, "
            "oci-archive:FILE:NAME or HOST/REPO[:TAG|@DIGEST].",
        ),
    ],
    catalog: CatalogOpt = Path("catalog.yaml"),
    layout: LayoutOpt = None,
    as_json: JsonOpt = False,
    max_retries: MaxRetriesOpt = 8,
    retry_deadline: DeadlineOpt = 900.0,
    insecure_registry: InsecureOpt = None,
    ca_file: CaFileOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Show an image's files, layers, sizes and annotations, from any store."""

    def go() -> None:
        remote = _remote(max_retries, retry_deadline, insecure=insecure_registry, ca_file=ca_file)
        info = api.inspect(ref, catalog=catalog, layout=layout, remote=remote)
        if as_json:
            _print_json(info)
            return
        _echo(f"{ref}  {info['digest']}  {human_size(info['bytes'])}")
        for key, value in sorted(info["annotations"].items()):
            _echo(f"  {key}: {value}")
        for platform in info["platforms"]:
            size = human_size(platform["bytes"])
            _echo(f"  platform {platform_name(platform)}  {platform['digest']}  {size}")
        for layer in info["layers"]:
            files = layer.get("files") or []
            label = files[0] if len(files) == 1 else f"{len(files)} files" if files else layer["mediaType"]
            _echo(f"  layer {layer['digest']}  {human_size(layer['size']):>10}  {label}")
        for f in info["files"]:
            _echo(f"  file {f['path']}" + (f"  {human_size(f['size'])}" if f.get("size") is not None else ""))

    _run(go, verbose, as_json, catalog)


@app.command()
def containerfile(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="A model name from the catalog.")],
    catalog: CatalogOpt = Path("catalog.yaml"),
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Print a Containerfile equivalent to the native build of one locked model (for buildah or Kaniko)."""

    def go() -> None:
        text = api.containerfile(catalog, model)
        if as_json:
            _print_json({"name": model, "containerfile": text})
        else:
            sys.stdout.write(text)

    _run(go, verbose, as_json, catalog)


@app.command()
def patch(
    models: ModelsArg = None,
    check: Annotated[
        bool,
        typer.Option(
            "--check",
            help="Change nothing; exit 1 naming the files a run would change, or the orphaned patches it finds "
            "(a model it cannot pin fails as patch does).",
        ),
    ] = False,
    allow_unpushed: Annotated[
        bool,
        typer.Option(
            "--allow-unpushed",
            help="Pin models built but not pushed to the catalog's registry/<name> with the lock's digest.",
        ),
    ] = False,
    prune: Annotated[
        bool,
        typer.Option(
            "--prune", help="Also remove the patches this lock wrote into overlays the catalog lists no more."
        ),
    ] = False,
    registry: Annotated[
        str | None,
        typer.Option(
            "--registry",
            help="Pin each image as PREFIX/<model>@digest (a mirror's, e.g. on an air-gapped side) instead of "
            "where the lock says it was pushed.",
        ),
    ] = None,
    catalog: CatalogOpt = Path("catalog.yaml"),
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Write the kustomize patches that pin each model's overlays to the lock's digests."""

    def go() -> None:
        cat = load_catalog(catalog)
        patched = api.patch(cat, models, allow_unpushed=allow_unpushed, check=check, prune=prune, registry=registry)
        planned, changed, orphaned = patched.planned, patched.changed, patched.orphaned
        # the command to run next: this one's options, which decide what it pins and what it finds
        same = [*(["--allow-unpushed"] if allow_unpushed else []), *(["--registry", registry] if registry else [])]
        failure = None  # why --check fails
        if check and changed:
            again = " ".join(["modelcar patch", *(["--prune"] if prune else []), *same])
            failure = f"{plural(len(changed), 'file')} out of step with {cat.lock_file.name}: run `{again}`"
        elif check and orphaned:
            prune_them = " ".join(["modelcar patch", "--prune", *same])
            failure = f"{plural(len(orphaned), 'patch file')} the catalog lists no more: run `{prune_them}`"
        failure = _shown(failure) if failure else None
        if as_json:
            _print_json(
                {
                    "check": check,
                    "files": [str(f.path) for f in planned if f.content is not None],
                    "changed": bool(changed),  # a boolean, as in lock and merge
                    "changedFiles": [str(f.path) for f in changed],
                    "removedFiles": [str(f.path) for f in changed if f.content is None],
                    "orphanedFiles": [str(path) for path in orphaned],
                    **({"error": failure} if failure else {}),
                }
            )
        elif check:
            for f in changed:
                note = " (its header only: written by an older modelcar)" if f.header_only() else ""
                _echo(f"stale: {f.path}{note}")
            for path in orphaned:
                _echo(f"orphaned: {path}")
        else:
            for f in changed:
                _echo(f"{'removed' if f.content is None else 'wrote'} {f.path}")
            if not changed:
                _echo(f"{sum(f.content is not None for f in planned)} files up to date")
        if orphaned:
            log.warning(
                "%d patch file(s) written from %s pin overlays the catalog lists no more (%s): `%s` removes "
                "them, or list the overlays in the catalog again",
                len(orphaned),
                cat.lock_file.name,
                ", ".join(str(path) for path in orphaned),
                " ".join(["modelcar patch", "--prune", *same]),
            )
        if failure:
            _echo(f"error: {failure}", err=True)
            raise typer.Exit(1)

    _run(go, verbose, as_json, catalog)


@app.command()
def plan(
    output_format: Annotated[str, typer.Option("--format", help="github-matrix, k8s-job or json.")] = "json",
    changed_only: Annotated[
        bool,
        typer.Option("--changed-only", help="Only models whose pinned image the registry does not have yet."),
    ] = False,
    catalog: CatalogOpt = Path("catalog.yaml"),
    registry: RegistryOpt = None,
    image: Annotated[
        str | None,
        typer.Option(
            "--image",
            help="k8s-job: the modelcar tool image the pods run (build it from "
            "containerfiles/modelcar-tool.Containerfile and push it where the cluster pulls from).",
        ),
    ] = None,
    parallelism: Annotated[int, typer.Option("--parallelism", min=1, help="k8s-job: pods at once.")] = 4,
    hf_secret: Annotated[str, typer.Option("--hf-secret", help="k8s-job: Secret with the Hub token.")] = "hf-token",
    registry_secret: Annotated[
        str, typer.Option("--registry-secret", help="k8s-job: docker-registry Secret for the push.")
    ] = "registry-credentials",
    results_claim: Annotated[
        str | None,
        typer.Option(
            "--results-claim",
            help="k8s-job: a PVC (ReadWriteMany across nodes) where pods write result-N.json for `modelcar merge`.",
        ),
    ] = None,
    pod_user: Annotated[
        str,
        typer.Option(
            "--pod-user",
            help="k8s-job: the UID the pods run as, or `namespace` to leave it to the cluster "
            "(OpenShift's restricted SCC assigns one from the namespace's range).",
        ),
    ] = str(POD_UID),
    storage_class: Annotated[
        str | None,
        typer.Option(
            "--storage-class",
            help="k8s-job: each pod's HF cache on a volume of this StorageClass, sized for the largest model "
            "(default: the node's disk, an emptyDir: too small for a large model on most nodes).",
        ),
    ] = None,
    cpu: Annotated[str, typer.Option("--cpu", help="k8s-job: each pod's CPU request.")] = "2",
    memory: Annotated[str, typer.Option("--memory", help="k8s-job: each pod's memory request and limit.")] = "4Gi",
    max_retries: MaxRetriesOpt = 8,
    retry_deadline: DeadlineOpt = 900.0,
    insecure_registry: InsecureOpt = None,
    ca_file: CaFileOpt = None,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """The work list for CI fan-out, one model per worker: a GitHub Actions matrix, a Kubernetes
    Indexed Job, or plain JSON (`--json` is `--format json`)."""

    def go() -> None:
        output = output_format.lower()
        if output not in ("github-matrix", "k8s-job", "json"):
            raise InputError(f"--format {output!r}: use github-matrix, k8s-job or json")
        if as_json and output != "json":
            raise InputError(f"--json is --format json: drop it or --format {output}")
        cat = load_catalog(catalog)
        if registry is not None and (problem := registry_prefix_problem(registry)):
            raise InputError(f"--registry: {problem}")
        uid_ok = pod_user == "namespace" or (re.fullmatch(r"[0-9]+", pod_user) and 0 < int(pod_user) < 2**31)
        if output == "k8s-job" and image is None:
            raise InputError(
                "--format k8s-job needs --image: the modelcar tool image the pods run (built from "
                "containerfiles/modelcar-tool.Containerfile)"
            )
        if output == "k8s-job" and not uid_ok:
            raise InputError(f"--pod-user {pod_user!r}: a UID from 1 to 2147483647, or `namespace`")
        remote = _remote(max_retries, retry_deadline, insecure=insecure_registry, ca_file=ca_file)
        entries = api.plan(cat, changed_only=changed_only, registry=registry, remote=remote)
        if output == "github-matrix":
            sys.stdout.write(json.dumps(github_matrix(entries), sort_keys=True) + "\n")
        elif output == "k8s-job":
            assert image is not None  # refused above, before the registry is asked
            if ca_file is not None:  # used by --changed-only's own lookups here; the pods cannot have it
                log.warning("--ca-file is not handed to the Job: its pods need the CA in the tool image (--image)")
            build_options = [*(["--registry", registry] if registry else [])]
            build_options += [f"--insecure-registry={host}" for host in insecure_registry or []]
            job = k8s_job(
                entries,
                catalog_path=str(catalog),
                image=image,
                parallelism=parallelism,
                hf_secret=hf_secret,
                registry_secret=registry_secret,
                results_claim=results_claim,
                storage_class=storage_class,
                cpu=cpu,
                memory=memory,
                build_options=build_options,
                pod_uid=None if pod_user == "namespace" else int(pod_user),
            )
            sys.stdout.write(dump_k8s_job(job))
        else:
            _print_json([e.to_json() for e in entries])

    _run(go, verbose, as_json, catalog)


@app.command()
def merge(
    results: Annotated[
        list[Path] | None,
        typer.Argument(
            metavar="RESULT", help="Result files written by `build --index N --result FILE` (none: nothing was built)."
        ),
    ] = None,
    catalog: CatalogOpt = Path("catalog.yaml"),
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Fold CI workers' results into the lock: the same bytes one machine building everything writes."""

    def go() -> None:
        cat = load_catalog(catalog)
        paths = results or []
        _, changed = api.merge(cat, paths)
        if as_json:
            _print_json({"lock": str(cat.lock_file), "changed": changed, "merged": len(paths)})
        else:
            _echo(f"{cat.lock_file}: {'updated' if changed else 'unchanged'} from {plural(len(paths), 'result')}")

    _run(go, verbose, as_json, catalog)


def _version(value: bool) -> None:
    if value:
        _echo(f"modelcar {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    pass


GRACE = 5.0  # seconds the main thread has to unwind after Ctrl-C or SIGTERM before the process ends anyway
_signalled: list[int] = []


def _interrupt(signum: int, frame: object) -> None:
    """Ctrl-C, and SIGTERM (a CI job cancelled), unwind the main thread: nothing is half-written
    (files land by rename, the lock last). Worker threads in the middle of a transfer, or asleep
    before a retry, are not waited for beyond GRACE; the temporary files they leave behind are
    swept by the next run (fsutil.sweep_stale)."""
    if not _signalled:
        _signalled.append(signum)
        threading.Thread(target=_exit_after, args=(GRACE, 128 + signum), daemon=True).start()
    raise KeyboardInterrupt


def _catch_signals() -> dict[int, Any]:
    """Ctrl-C and SIGTERM through `_interrupt`; what was there before, to put back. Only from the
    main thread (the only one Python lets set handlers), and not a signal the shell told this
    process to ignore (`modelcar build ... &` in a script is not stopped by the user's Ctrl-C)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous: dict[int, Any] = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(signum)
        if handler is not signal.SIG_IGN:
            previous[signum] = handler
            signal.signal(signum, _interrupt)
    return previous


def _exit_after(seconds: float, code: int) -> None:
    """The end of a run whose main thread did not unwind in time (it waits on a transfer in
    flight): the error line, and with --json its document, as an unwound run prints them."""
    time.sleep(seconds)
    sys.stderr.write(INTERRUPTED + "\n")
    sys.stderr.flush()
    if _json_run and _json_run[0]:
        with suppress(OSError, ValueError):  # stdout gone: the exit code says it all the same
            _print_json({"error": INTERRUPTED})
            sys.stdout.flush()
    os._exit(code)


def _limit_malloc_arenas() -> None:
    """Cap glibc's per-thread malloc arenas at 2.

    Downloads, hashing and uploads run in threads that each allocate and free 8-10 MiB buffers;
    glibc gives every thread its own arena and keeps their freed memory, so peak RSS grew with
    the thread count (274 -> 213 MiB on the 1 GiB benchmark push, 167 -> 127 MiB for a layout
    build, same wall time). Best effort: other C libraries are left alone.
    """
    if "MALLOC_ARENA_MAX" in os.environ or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-8, 2)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def _started_as_modelcar() -> bool:
    """Whether this process is the `modelcar` command (its console script, `python -m modelcar`),
    not a program of someone else's that calls main(): only the command may be started again."""
    entry = sys.modules.get("__main__")
    spec = getattr(entry, "__spec__", None)
    if spec is not None and spec.name in ("modelcar", "modelcar.__main__"):
        return True
    return os.path.basename(getattr(entry, "__file__", None) or "") == "modelcar"


def _utf8_file_names() -> None:
    """Run again in Python's UTF-8 mode under a locale that is not UTF-8 (LANG=en_US.ISO-8859-1):
    a local model's file names are UTF-8 in the lock, in the tar headers and in the digests, on
    any machine; decoded as Latin-1 they were written twice-encoded (another digest) or not found.
    `-X utf8` on the command line holds where PYTHONUTF8 would not (-E, -I, a later -X utf8=0)."""
    again = os.environ.pop("MODELCAR_UTF8_EXEC", None)  # not handed on to what this run starts
    if sys.flags.utf8_mode or sys.getfilesystemencoding().replace("-", "").lower() == "utf8":
        return
    if again or not _started_as_modelcar():
        sys.stderr.write("modelcar: the locale is not UTF-8: set PYTHONUTF8=1, or file names may not read right\n")
        return
    os.environ["MODELCAR_UTF8_EXEC"] = "1"
    os.execv(sys.executable, [sys.executable, "-X", "utf8", *sys.orig_argv[1:]])


class _ReaderMayGo:
    """stdout for a reader that may go away (`modelcar build ... | head -1`): once it has, output is
    dropped instead of raising BrokenPipeError in the middle of a command, which still ends as it
    would (a failed model still said on stderr, with its exit code); a run that went well exits
    141 then, quietly, as cat does."""

    def __init__(self, out: Any) -> None:
        self._out = out
        self.gone = False

    def write(self, text: str) -> int:
        if not self.gone:
            try:
                return int(self._out.write(text))
            except BrokenPipeError:
                self._went()
        return len(text)

    def flush(self) -> None:
        if not self.gone:
            try:
                self._out.flush()
            except BrokenPipeError:
                self._went()

    def _went(self) -> None:
        self.gone = True
        os.dup2(os.open(os.devnull, os.O_WRONLY), self._out.fileno())  # nothing flushed into it at exit

    def __getattr__(self, name: str) -> Any:
        return getattr(self._out, name)


def main() -> None:
    _utf8_file_names()
    # Our own progress bars replace huggingface_hub's per-file ones.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # httpx imports its own command line client (click, rich, pygments) with itself; modelcar never
    # runs it, and leaving it out takes ~40 ms off every start-up that talks to a registry.
    sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]
    _limit_malloc_arenas()
    previous = _catch_signals()
    # What the imports made so far (typer, pydantic and the catalog models, yaml) lives as long as
    # the process: frozen, the cyclic GC's full passes skip it (one such pass in a `build --update
    # --push` took 22-25 ms of its 0.5 s).
    gc.freeze()
    stdout = None if sys.stdout is None else _ReaderMayGo(sys.stdout)  # None: started with stdout closed
    if stdout is not None:
        sys.stdout = stdout
    try:
        app()
    except SystemExit as exc:
        if stdout is not None and stdout.gone and exc.code in (0, None):
            raise SystemExit(128 + signal.SIGPIPE) from None
        raise
    finally:
        # The same for whatever is alive at the end. Left to the cyclic GC, the interpreter's exit
        # traverses every object the imports made (pydantic, huggingface_hub, httpx), several
        # times: 0.1-0.15 s of a `build --update --push`. Frozen, they are freed by the OS; module
        # teardown still closes files and runs finalizers by refcount (what only a reference cycle
        # keeps alive is not finalized: every command has closed and fsynced what it wrote before
        # it returns). main() is the process's entry point: it runs once.
        gc.freeze()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if _signalled:  # interrupted: do not wait for worker threads still in a transfer
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(128 + _signalled[0])
