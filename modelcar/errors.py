"""Errors that reach the user.

Every error a user can act on is a ModelcarError whose message says what went wrong, where
(file, model, field) and what to do. The CLI maps `exit_code` to the process exit status:
2 for bad input (catalog, arguments), 1 for failures while doing the work.
"""

import errno
import re
from collections.abc import Mapping
from typing import Generic, Self, TypeVar

R = TypeVar("R")


class ModelcarError(Exception):
    exit_code = 1


class PartialFailure(ModelcarError, Generic[R]):
    """Some models failed and the others went through: `results` has what the run did, for the
    caller to report (and keep) before it fails; `errors` each failed model's error as it was
    raised (a NotBuilt, a RegistryError, an OSError: a script acts on its kind, not its words)."""

    def __init__(self, message: str, results: list[R], errors: Mapping[str, BaseException] | None = None) -> None:
        super().__init__(message)
        self.results = results
        self.errors = dict(errors or {})

    @classmethod
    def of(cls, errors: Mapping[str, BaseException], results: list[R], *more: str) -> Self:
        """The failure of the models in `errors`, a line each, and of what `more` says: exiting as
        an input error where each model's is one (a CI job tells "fix the PR" from "run again")."""
        failure = cls(
            "\n".join([*(_of_model(name, error_message(exc)) for name, exc in errors.items()), *more]), results, errors
        )
        if errors and not more and all(isinstance(exc, InputError) for exc in errors.values()):
            failure.exit_code = InputError.exit_code
        return failure


def _of_model(name: str, message: str) -> str:
    """A model's error as a line of several models': led by its name, once."""
    return message if message.startswith(f"{name}: ") else f"{name}: {message}"


class InputError(ModelcarError):
    """The user's input (catalog, lock, arguments) is wrong; nothing was attempted."""

    exit_code = 2


class CatalogError(InputError):
    pass


class LockError(InputError):
    pass


class NotLocked(InputError):
    """The lock has no entry for a model the command needs pinned: `modelcar lock` (or `build`) it."""


class NotBuilt(ModelcarError):
    """The lock pins no image for a model, or the image it pins is nowhere to be read: `modelcar
    build` it (a script can catch this and build, where other failures should stop it)."""


class PatchError(InputError):
    """A catalog overlay that cannot be patched as written (exit 2)."""


def said_of(exc: ModelcarError, prefix: str) -> ModelcarError:
    """The same error said of `prefix` (a catalog entry's `file: models[N] (name)`), of the same
    kind (a script tells a Hub's failure from a catalog's by it) where it can be made anew."""
    located = _made(type(exc), f"{prefix}: {exc}")
    located.__cause__ = exc
    return located


def _made(kind: type[ModelcarError], message: str) -> ModelcarError:
    """An error of `kind`; of the kind its exit code comes from where `kind` is made with more
    than its message."""
    try:
        return kind(message)
    except TypeError:
        return (InputError if issubclass(kind, InputError) else ModelcarError)(message)


def all_of(failures: list[ModelcarError]) -> ModelcarError:
    """One error for several models' failures (those a run could not pin, say), a line each: of
    their kind where they share it (a script tells a Hub's failure from a catalog's), exiting as
    an input error only where every one is."""
    if len(failures) == 1:
        return failures[0]
    kinds = {type(f) for f in failures}
    kind: type[ModelcarError] = ModelcarError
    if len(kinds) == 1:
        kind = kinds.pop()
    elif all(isinstance(f, InputError) for f in failures):
        kind = InputError
    combined = _made(kind, "\n".join(str(f) for f in failures))
    combined.__cause__ = failures[0]
    return combined


class HubError(ModelcarError):
    """The Hub could not be reached or answered with an error, after retries."""


class BlobNotFound(ModelcarError):
    """A store holds no blob of that digest (a layout or archive missing it, a registry's 404)."""


class IntegrityError(ModelcarError):
    """Bytes on disk or from the network do not match the digest the lock pins."""


class DigestMismatch(IntegrityError):
    """A blob's bytes are not the ones the digest it was written under promised; nothing was stored."""


# user:password@ up to the last @ of the authority, which ends at a path, or at a query or fragment
# (`?name=`, `#name=`: a bare `?` or `#` may be a password's); also in a URL quoted in JSON
# (`https:\/\/`) or percent-encoded inside another URL (after `%3D`, `%26` or `%3F` too). A
# scheme starts where no scheme character comes before it: each position tried once, not again
# for every longer run before it (a long `a.a.a...` line took seconds).
_URL_CREDENTIALS = re.compile(
    r"(?i)((?:(?<![a-z0-9+.-])|(?<=%3d)|(?<=%26)|(?<=%3f))[a-z][a-z0-9+.-]*(?:://|:\\/\\/|%3a%2f%2f))"
    r"(?:(?!%2f|%3f|%23|\\/|[?#][\w.~-]*=)[^/\s])*(?:@|%40)"
)
# The query parameters that make a URL a credential: S3's, GCS's, Tencent's, Huawei's and Alibaba's
# presigned URLs (where the Hub sends a download, or a registry a blob), CloudFront's and Akamai's
# signed ones, Azure's SAS, any token, secret, password or key passed in the query; after `?`, `&`,
# `;` or `#`, also JSON-escaped, HTML-escaped or percent-encoded (a URL quoted inside another).
# A name is matched by what it ends in (`x-cos-security-token`, `client_secret`): a harmless
# parameter redacted in an error line costs nothing, a credential printed in a CI log does.
_SEPARATOR = r"(?:[?&;#]|\\u0026|&amp;|%26|%3f)"
_SECRET_NAME = (
    r"(?:[a-z0-9_.-]*(?:signature|credential|token|secret|password|passwd|api[_-]?key|access[_-]?key(?:[_-]?id)?)"
    r"|__token__|sig|policy|key-pair-id|hdnts|key)"
)
_URL_SIGNATURE = re.compile(rf"(?i)({_SEPARATOR}{_SECRET_NAME}(?:=|%3d))(?:(?!%26|\\u0026|&amp;)[^&\s#'\"\\;])+")


def without_credentials(text: str) -> str:
    """`text` with the user:password of every URL in it left out, and the signature of a signed
    URL: an HF_ENDPOINT or a proxy's URL may carry the first, and a download the Hub redirects
    goes to a URL that is a credential for an hour; errors and logs end up in CI logs anyone
    with read access sees."""
    return _URL_SIGNATURE.sub(r"\1REDACTED", _URL_CREDENTIALS.sub(r"\1", text))


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """`text` with its control characters (line breaks and tabs aside) written as escapes: what a
    store or a server says (a tar path, an annotation, a registry's error message) is printed on a
    terminal, where an escape sequence in it would clear the screen or rewrite what came before."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def os_error_message(exc: OSError) -> str:
    """`PATH: what went wrong`, the way a shell tool says it, without a traceback; for a limit of
    this process (open files), which setting to change."""
    if exc.filename is None:
        message = exc.strerror or str(exc)
    else:
        message = f"{exc.filename}: {exc.strerror or exc}"
        if exc.filename2 is not None:
            message += f" (-> {exc.filename2})"
    if exc.errno == errno.EMFILE:
        message += " (this process's limit: raise `ulimit -n`, or lower --jobs and --hf-workers)"
    return message


def error_message(exc: BaseException) -> str:
    """One line for a failure that ends one model's work but not the run's: a modelcar error as
    it says itself, an OSError the way os_error_message says it."""
    return os_error_message(exc) if isinstance(exc, OSError) else str(exc)
