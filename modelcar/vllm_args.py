"""vLLM's command line in a container: where it names the model, and how a patch edits it.

A patch sets the model through the container's `args`, so it must know the ways a pod spec runs
vLLM: straight (`vllm serve`), through a launcher (`env`, `tini`, `dumb-init`), or in a shell line
that hands its arguments on; a command that names the model itself would be left serving the old
path, with no error anywhere.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from modelcar.errors import PatchError


def _is_flag(arg: str) -> bool:
    return arg.startswith("-")


def _with_served_name(args: list[str], served_name: str) -> list[str] | None:
    """`args` with the value of `--served-model-name` (one or more words) set to `served_name`;
    None when they do not have the flag."""
    for i, arg in enumerate(args):
        if arg.startswith("--served-model-name="):
            return [*args[:i], f"--served-model-name={served_name}", *args[i + 1 :]]
        if arg == "--served-model-name":
            end = i + 1
            while end < len(args) and not _is_flag(args[end]):
                end += 1
            return [*args[: i + 1], served_name, *args[end:]]
    return None


def _later_positional(args: list[str], start: int) -> str | None:
    """A bare word after the options that no option takes as its value (an option takes the word
    after it, `--name=value` none, `--served-model-name` every word up to the next option): a
    model named after the options, which vLLM's parser takes as its positional all the same."""
    taker: str | None = None  # the option the next bare word is the value of
    for word in args[start:]:
        if _is_flag(word):
            taker = None if "=" in word else word
        elif taker is None:
            return word
        elif taker != "--served-model-name":
            taker = None
    return None


def edit_vllm_args(args: list[str], served_path: str, served_name: str, *, positional: bool = True) -> list[str]:
    """The base's vLLM arguments with the model set to `served_path` and the served model name
    to `served_name`, every other argument kept in its order; a `--tokenizer` that named the
    same model as the model argument follows it (offline, a Hub id there is not reached).

    The model is the positional argument of `vllm serve MODEL` (after a leading `serve` when the
    command is bare `vllm`), or the value of `--model X`/`--model=X`; without either, it goes in
    as the positional, or as `--model` where the command takes no positional (`positional=False`:
    the old `python -m vllm.entrypoints.openai.api_server`). A model named after the options
    (`--port 8000 Qwen/...`, which vLLM takes) is refused: a second positional would stop vLLM.
    """
    out = list(args)
    start = 1 if out[:1] == ["serve"] else 0
    old: str | None = None
    for i, arg in enumerate(out):
        if arg == "--model" and i + 1 < len(out):
            old, out[i + 1] = out[i + 1], served_path
            break
        if arg.startswith("--model="):
            old, out[i] = arg.partition("=")[2], f"--model={served_path}"
            break
    else:
        if not positional:
            out[start:start] = ["--model", served_path]
        elif start < len(out) and not _is_flag(out[start]):
            old, out[start] = out[start], served_path
        elif (later := _later_positional(out, start)) is not None:
            raise PatchError(
                f"the vLLM arguments name the model after their options ({later!r}), where a patch cannot "
                "tell it from an option's value: put it first (`vllm serve MODEL ...`) or pass it as "
                "`--model MODEL`, in the base or in the overlay's `args:` in the catalog"
            )
        else:
            out.insert(start, served_path)
    if old is not None and old != served_path:
        out = [_retokenized(word, out[i - 1] if i else "", old, served_path) for i, word in enumerate(out)]
    return _with_served_name(out, served_name) or [*out, "--served-model-name", served_name]


def _retokenized(word: str, before: str, old: str, served_path: str) -> str:
    """`word`, or the served path where it is `--tokenizer`'s value naming the old model."""
    if before == "--tokenizer" and word == old:
        return served_path
    return f"--tokenizer={served_path}" if word == f"--tokenizer={old}" else word


def edit_kserve_args(args: list[str], served_name: str) -> list[str]:
    """KServe's Hugging Face runtime names the served model with `--model_name`; a runtime that
    runs vLLM itself takes vLLM's `--served-model-name` (the model path is KServe's /mnt/models)."""
    if (named := _with_served_name(args, served_name)) is not None:
        return named
    out = list(args)
    for i, arg in enumerate(out):
        if arg.startswith("--model_name="):
            out[i] = f"--model_name={served_name}"
            return out
        if arg == "--model_name" and i + 1 < len(out):
            out[i + 1] = served_name
            return out
    return [f"--model_name={served_name}", *out]


FORWARDED = ("$@", "${@}")  # a shell wrapper's own arguments, handed on
SHELLS = frozenset({"sh", "bash", "dash", "ash", "zsh", "ksh"})
# Programs that run the rest of their command line: `env [-i] [NAME=VALUE]... PROGRAM ...`, `tini -- ...`
# and the options of each that take a value: short letters (alone or ending a cluster: `-iu HOME`),
# long options (`--unset HOME`; `--unset=HOME` carries its own)
LAUNCHERS = {
    "env": ("uCS", frozenset({"--unset", "--chdir", "--split-string"})),
    "tini": ("pe", frozenset()),
    "dumb-init": ("r", frozenset({"--rewrite"})),
}


def _takes_value(word: str, letters: str, long: frozenset[str]) -> bool:
    """Whether a launcher's option word takes the next word as its value: read from the left, the
    first letter that takes a value takes the rest of the word (`-uHOME`, `-iuHOME`), or the next
    word when it ends the cluster (`-u HOME`, `-iu HOME`)."""
    if word.startswith("--"):
        return word in long
    cluster = word[1:]
    return next((k == len(cluster) - 1 for k, ch in enumerate(cluster) if ch in letters), False)


def _names_model(words: list[str]) -> bool:
    """Whether a vLLM command line names a model itself: `serve MODEL` or `--model`."""
    serve = words.index("serve") + 1 if "serve" in words else None
    model = words[serve] if serve is not None and serve < len(words) else None
    named = model is not None and not _is_flag(model) and model not in FORWARDED and model.strip(";&|()<>")
    return bool(named) or any(w == "--model" or w.startswith("--model=") for w in words)


def _script_words(script: str) -> list[str]:
    """A `sh -c` script as words, the way the shell reads them: continued lines joined, comments
    dropped, `;`, `&&` and `|` words of their own."""
    lexer = shlex.shlex(script.replace("\\\n", " "), posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    try:
        return list(lexer)
    except ValueError:  # unbalanced quotes: the shell would refuse it too
        return script.split()


def _program(command: list[str]) -> list[str]:
    """The command line from the program it runs: past `env`'s options and NAME=VALUE words,
    `tini --`, `dumb-init --`."""
    i = 0
    while i < len(command) and Path(command[i]).name in LAUNCHERS:
        letters, long = LAUNCHERS[Path(command[i]).name]
        i += 1
        while i < len(command) and (command[i].startswith("-") or "=" in command[i]):
            if command[i] == "--":
                i += 1
                break
            word = command[i]
            i += 2 if word.startswith("-") and _takes_value(word, letters, long) else 1
    return command[i:]


SHELL_VALUE_OPTIONS = frozenset({"--rcfile", "--init-file"})  # long options that take the next word


def _shell_options(words: list[str]) -> tuple[int, bool]:
    """For `SHELL [OPTIONS] [OPERAND...]`: where the operands start, and whether `-c` was given
    (alone or in a cluster: `-lc`, `-ec`). Each `o`/`O` of a cluster takes the next word
    (`-euo pipefail`), as do `--rcfile` and `--init-file`. With `-c` the first operand is the script."""
    i, c = 1, False
    while i < len(words) and words[i][:1] in "-+" and words[i] != "--":
        word = words[i]
        if word.startswith("--"):
            i += 2 if word in SHELL_VALUE_OPTIONS else 1
            continue
        letters = word[1:]
        c = c or "c" in letters
        i += 1 + letters.count("o") + letters.count("O")
    return i + (i < len(words) and words[i] == "--"), c


OLD_ENTRYPOINT = "vllm.entrypoints.openai.api_server"  # `python -m` it: no positional model, only --model


def takes_positional(container: dict[str, Any] | None) -> bool:
    """Whether the container's command takes the model as a positional (`vllm serve`, or the
    image's entrypoint), not only as `--model` (the old api_server module)."""
    words = _program([str(c) for c in (container or {}).get("command") or []])
    return not any(OLD_ENTRYPOINT in w for w in words)


def check_command(where: str, container: dict[str, Any] | None) -> None:
    """The patch sets the model through `args`: a `command` that runs a shell line or names the
    model itself would leave vLLM serving the old path (or two), with no error anywhere."""
    command = [str(c) for c in (container or {}).get("command") or []]
    if not command:
        return
    shown = " ".join(command)[:80]
    words = _program(command)
    if words and Path(words[0]).name in SHELLS:
        start, c = _shell_options(words)
        script = start if c and start < len(words) else None
        if start >= len(words):
            # `command: [sh]` (or `[bash, -o, pipefail]`), `args: [-c, SCRIPT]`: the patch's args
            # would replace the script
            raise PatchError(
                f"{where}: the container's command is a shell ({shown}) that takes its script from "
                "`args`, which modelcar's patch replaces: run vLLM directly (command: [vllm, serve] or the "
                'image\'s entrypoint), or put the script in `command` and have it hand on "$@"'
            )
        if script is not None:
            # `sh -c '... exec vllm serve "$@"' --` hands the container's args on, after the $0 placeholder
            if not (script + 1 < len(words) and any(f in words[script] for f in FORWARDED)):
                raise PatchError(
                    f"{where}: the container's command is a shell line ({shown}) that does not hand its "
                    'arguments on ("$@" after a $0 placeholder such as --): run vLLM directly (command: '
                    "[vllm, serve] or the image's entrypoint) with its arguments in `args:`"
                )
            words = _script_words(words[script])
    if _names_model(words):
        raise PatchError(
            f"{where}: the container's command names the model ({shown}): keep only "
            "`command: [vllm, serve]` (or none) and move the model and the options to `args:`"
        )
