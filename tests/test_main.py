"""The `modelcar` entry point itself, in a fresh interpreter."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from modelcar import __version__
from modelcar.cli import INTERRUPTED
from modelcar.image import LARGE_FILE
from tests.conftest import Cli, run_module, write_catalog
from tests.fakehub import FakeHub
from tests.faultproxy import FaultProxy


def test_main_leaves_what_is_alive_at_exit_to_the_os() -> None:
    """main() freezes the cyclic GC on the way out, also when the command exits through SystemExit:
    the interpreter's exit then skips traversing every object the imports made."""
    code = (
        "import atexit, gc, sys; sys.argv = ['modelcar', '--version']; "
        "atexit.register(lambda: print('frozen', gc.get_freeze_count())); "
        "from modelcar.cli import main; main()"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    version, frozen = done.stdout.splitlines()
    assert version == f"modelcar {__version__}"
    assert frozen.split()[0] == "frozen" and int(frozen.split()[1]) > 10_000  # typer, pydantic, the catalog models


def test_main_freezes_what_the_imports_made_before_the_command_runs() -> None:
    code = (
        "import gc, sys; import modelcar.cli as cli; "
        "cli.app = lambda: print('frozen', gc.get_freeze_count()); cli.main()"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    label, count = done.stdout.split()
    assert label == "frozen" and int(count) > 10_000


def test_every_subcommand_takes_the_common_options(cli: Cli) -> None:
    """README: every subcommand takes -c/--catalog, --json and -v after its name."""
    from modelcar.cli import app

    names = [c.name or (c.callback.__name__ if c.callback else "") for c in app.registered_commands]
    assert len(names) >= 10
    for name in names:
        text = cli(name, "--help").stdout
        for option in (r"(--catalog\s+-c|-c, --catalog)\b", r"--json\b", r"(--verbose\s+-v|-v, --verbose)\b"):
            assert re.search(option, text), (name, option)
    # the exit codes a CI step acts on, where --help is read (they were in the README only)
    text = " ".join(cli("--help").stdout.split())
    assert "Exit codes: 0 ok; 1 a failure" in text and "2 bad input" in text and "130/143 interrupted" in text


def test_a_usage_error_in_a_log_is_one_plain_line() -> None:
    """Off a terminal, a mistyped option is click's `Error: ...` line, not an 80-column box."""
    done = run_module("build", "--jobs", "0")
    assert done.returncode == 2, done.stderr
    assert "Error: Invalid value for '--jobs' / '-j': Input should be greater than or equal to 1" in done.stderr
    assert not set("╭│╰") & set(done.stderr), done.stderr


def test_plan_json_is_format_json(cli: Cli, tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    cat = write_catalog(tmp_path / "catalog.yaml", "models:\n  - name: m\n    path: ./m\n")
    cli("lock", "-c", cat)
    assert cli("plan", "-c", cat, "--json").stdout == cli("plan", "-c", cat, "--format", "json").stdout
    assert "--json is --format json" in cli("plan", "-c", cat, "--json", "--format", "k8s-job", code=2).stderr


def test_json_says_why_every_command_failed(cli: Cli, tmp_path: Path) -> None:
    """`--json`: one JSON document on stdout, also when a command fails before its own (a catalog
    that is not there, a model not built), with the same words as the error line."""
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    cat = write_catalog(tmp_path / "catalog.yaml", "models:\n  - name: m\n    path: ./m\n")
    unlocked = write_catalog(tmp_path / "unlocked.yaml", "models:\n  - name: m\n    path: ./m\n")
    cli("lock", "-c", cat)
    runs = [  # 2: the input is to fix (catalog, lock, arguments); 1: the work failed
        (["lock", "-c", tmp_path / "none.yaml"], 2),
        (["verify", "-c", cat, "nosuch"], 2),
        (["patch", "-c", cat, "nosuch"], 2),
        (["push", "-c", cat, "--registry", "127.0.0.1:9/x", "--max-retries", "0"], 1),  # not built
        (["push", "-c", unlocked, "--registry", "127.0.0.1:9/x"], 2),  # not locked, as patch says it
        (["verify", "-c", unlocked], 2),  # and verify
        (["mirror", "-c", cat, "--from", f"oci-archive:{tmp_path / 'none.tar'}", "--to", f"oci:{tmp_path}/l"], 2),
        (["mirror", "-c", cat, "--to", "hf-cache:"], 2),  # `hf-cache:$UNSET`: not the current directory
        (["inspect", "-c", cat, "m"], 1),
        (["merge", "-c", cat, tmp_path / "none.json"], 2),
    ]
    for args, code in runs:
        result = cli(*args, "--json", code=code)
        error = json.loads(result.stdout)["error"]
        assert error and f"error: {error}" in result.stderr, args
    assert "'hf-cache:': name the directory" in cli("mirror", "-c", cat, "--to", "hf-cache:", code=2).stderr
    result = cli("verify", "-c", cat, "--from", f"oci-archive:{tmp_path}", code=1)  # there, and no archive
    assert result.stderr == f"error: oci-archive:{tmp_path}: cannot read the archive (Is a directory)\n"


def test_a_bug_still_ends_in_one_error_line_and_document(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception no command expects (a bug, a library's surprise): its traceback for the report,
    with no credential in it, then the error line and `{"error": ...}` like any failure."""
    from modelcar import api

    def broken(*_: object, **__: object) -> None:
        raise TypeError("cannot read https://alice:s3cret@registry.example/v2/: unhashable type")

    monkeypatch.setattr(api, "containerfile", broken)
    cat = write_catalog(tmp_path / "catalog.yaml", "models:\n  - name: m\n    path: ./m\n")
    result = cli("containerfile", "-c", cat, "m", "--json", code=1)
    error = json.loads(result.stdout)["error"]
    assert error.startswith("unexpected TypeError: cannot read https://") and "modelcar bug" in error
    assert "Traceback (most recent call last)" in result.stderr and f"error: {error}" in result.stderr
    assert "s3cret" not in result.stdout + result.stderr
    # every line of it carries the prefix: a CI log grepped for `modelcar:` gets all of the event
    assert all(line.startswith(("modelcar: ", "error: ")) for line in result.stderr.splitlines()), result.stderr


def test_a_malformed_hf_endpoint_is_an_input_error(tmp_path: Path) -> None:
    """A typo in HF_ENDPOINT made huggingface_hub fail as it was imported, with a traceback."""
    cat = write_catalog(tmp_path / "catalog.yaml", "models:\n  - name: m\n    hf: org/m\n")
    bad = (
        "http://bob:pw@[::1",
        "http://127.0.0.1:99999",
        "huggingface.co",
        "bob:pw@hub.example:8080",
        "https://bob:p/w@h",
    )
    for endpoint in bad:
        env = {**os.environ, "HF_ENDPOINT": endpoint}
        done = subprocess.run(
            [sys.executable, "-m", "modelcar", "lock", "-c", str(cat), "--json"],
            capture_output=True, text=True, env=env, timeout=120,
        )  # fmt: skip
        assert done.returncode == 2, done.stderr
        error = json.loads(done.stdout)["error"]
        assert error.startswith("HF_ENDPOINT ") and "is not a URL" in error and "Traceback" not in done.stderr
        assert "pw" not in done.stdout + done.stderr and "p/w" not in done.stdout + done.stderr
    # a command that asks the Hub nothing is not stopped by it
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "config.json").write_text("{}")
    local = write_catalog(tmp_path / "local.yaml", "models:\n  - name: m\n    path: ./local\n")
    env = {**os.environ, "HF_ENDPOINT": "huggingface.co"}
    done = subprocess.run([sys.executable, "-m", "modelcar", "lock", "-c", str(local)], capture_output=True, env=env)
    assert done.returncode == 0, done.stderr


def test_main_leaves_signal_handling_as_it_found_it() -> None:
    """main() catches Ctrl-C and SIGTERM only while it runs, only from the main thread, and never a
    signal the process was told to ignore (a background job keeps ignoring the user's Ctrl-C)."""
    code = (
        "import signal, sys, threading\n"
        "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        "from modelcar import cli\n"
        "seen = {}\n"
        "real = cli.app\n"
        "def app():\n"
        "    seen.setdefault('int', signal.getsignal(signal.SIGINT) is signal.SIG_IGN)\n"
        "    seen.setdefault('term', signal.getsignal(signal.SIGTERM) is cli._interrupt)  # the main thread's run\n"
        "    real()\n"
        "cli.app = app\n"
        "sys.argv = ['modelcar', '--version']\n"
        "try:\n"
        "    cli.main()\n"
        "except SystemExit:\n"
        "    pass\n"
        "after = signal.getsignal(signal.SIGTERM) is signal.SIG_DFL\n"
        "after = after and signal.getsignal(signal.SIGINT) is signal.SIG_IGN\n"
        "errors = []\n"
        "def in_thread():\n"
        "    try:\n"
        "        cli.main()\n"
        "    except SystemExit:\n"
        "        pass\n"
        "    except Exception as exc:\n"
        "        errors.append(repr(exc))\n"
        "t = threading.Thread(target=in_thread); t.start(); t.join()\n"
        "print(seen['int'], seen['term'], after, errors)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "True True True []"


def _ctrl_c_on() -> None:
    """In the child: SIGINT as a terminal gives it. Under a shell's background job (`pytest &` in a
    script) SIGINT is ignored, the child inherits that, and Python then never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


# A library script's first line: SIGUSR1 prints every thread's stack (what an exit is waiting for).
STACKS_ON_USR1 = "import faulthandler, signal; faulthandler.register(signal.SIGUSR1, all_threads=True)\n"


def _interrupted_ends(proc: subprocess.Popen[str], timeout: float = 60) -> str:
    """SIGINT to `proc` (started with _ctrl_c_on and STACKS_ON_USR1), then its stderr once it ends
    within `timeout`; if it does not, the failure shows each of its threads' stacks."""
    proc.send_signal(signal.SIGINT)
    try:
        return proc.communicate(timeout=timeout)[1]
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGUSR1)
        time.sleep(2)
        proc.kill()
        stacks = proc.communicate()[1]
        pytest.fail(f"still running {timeout:.0f}s after SIGINT; its threads:\n{stacks[-12000:]}")


def test_ctrl_c_stops_a_library_build_waiting_to_retry(fake_hub: FakeHub, tmp_path: Path) -> None:
    """A script calling api.build, not the command line: its Ctrl-C does not sit through a
    Retry-After of 300 s in a download thread the interpreter waits for at exit."""
    fake_hub.add_repo("org/tiny", {"config.json": b"{}", "model.safetensors": b"\1" * (LARGE_FILE + 1)})
    cat = write_catalog(tmp_path / "catalog.yaml", "models:\n  - name: tiny\n    hf: org/tiny\n")
    fake_hub.inject("file", status=503, headers={"Retry-After": "300"}, path="model.safetensors", times=100)
    script = (
        STACKS_ON_USR1 + "import logging; from pathlib import Path; logging.basicConfig()\n"
        "from modelcar import api\n"
        f"api.build(Path({str(cat)!r}))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True, preexec_fn=_ctrl_c_on)
    try:
        seen = ""
        while "retry 1/8 in 300.0s" not in seen:  # the download thread is asleep before its retry
            line = proc.stderr.readline() if proc.stderr else ""
            assert line, f"the build ended before it waited to retry: {seen}"
            seen += line
        stderr = _interrupted_ends(proc)  # not the 300 s the server asked to wait
    finally:
        proc.kill()
    assert "KeyboardInterrupt" in stderr and proc.returncode != 0


def test_ctrl_c_stops_a_retry_that_begins_after_it(fault_proxy: FaultProxy, cli: Cli, tmp_path: Path) -> None:
    """A push whose HEAD was in flight when Ctrl-C came: its upload, asked after the HEAD's answer,
    is refused with Retry-After: 300; that retry belongs to the interrupted run and gives up."""
    model = tmp_path / "m"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"\1" * (LARGE_FILE + 1))
    cat = write_catalog(tmp_path / "catalog.yaml", "models:\n  - name: m\n    path: ./m\n")
    cli("build", "-c", cat)
    fault_proxy.stall("HEAD", r"/blobs/sha256:", seconds=3, times=100)
    fault_proxy.fail_429("POST", r"/blobs/uploads/", retry_after=300, times=100)
    script = (
        STACKS_ON_USR1 + "import logging; from pathlib import Path; logging.basicConfig()\n"
        "from modelcar import api\n"
        f"api.push(Path({str(cat)!r}), registry={fault_proxy.host + '/mc'!r})\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True, preexec_fn=_ctrl_c_on)
    try:
        deadline = time.monotonic() + 60
        while not fault_proxy.stalled():  # the HEAD is held: in flight
            assert proc.poll() is None and time.monotonic() < deadline, "the push never asked"
            time.sleep(0.05)
        stderr = _interrupted_ends(proc)  # not the 300 s the server asked to wait
    finally:
        proc.kill()
        fault_proxy.release()
    assert "KeyboardInterrupt" in stderr and proc.returncode != 0


def test_the_utf_8_mode_is_asked_for_once() -> None:
    """Under a locale that is not UTF-8, the command runs Python again in its UTF-8 mode, once, and
    so that it holds: PYTHONUTF8 loses to -X utf8=0 (and is ignored under -I): the run began again
    forever. A program that calls main() itself is not started again (what it did before would be
    done twice): it is told to set PYTHONUTF8."""
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONCOERCECLOCALE": "0"}
    env.pop("MODELCAR_UTF8_EXEC", None)
    done = subprocess.run(
        [sys.executable, "-X", "utf8=0", "-m", "modelcar", "--version"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0 and done.stdout == f"modelcar {__version__}\n", done.stderr
    code = "import sys; print('host'); sys.argv = ['modelcar', '--version']; from modelcar.cli import main; main()"
    done = subprocess.run(
        [sys.executable, "-X", "utf8=0", "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 0 and done.stdout == f"host\nmodelcar {__version__}\n", done.stderr
    assert "the locale is not UTF-8: set PYTHONUTF8=1" in done.stderr


def test_a_closed_stdout_is_no_error() -> None:
    """Started with stdout closed (`modelcar ... >&-`): nothing to print to, nothing to fail on."""
    command = f"{sys.executable} -m modelcar --version >&-; echo rc=$?"
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60)
    assert done.stdout == "rc=0\n" and done.stderr == ""


def _terminated_in_a_stall(fault_proxy: FaultProxy, argv: list[str]) -> tuple[int, str, str]:
    """`modelcar ARGV` sent SIGTERM once a request of it is held by the proxy's stall: exit code,
    stdout, stderr."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "modelcar", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_ctrl_c_on,
    )
    try:
        deadline = time.monotonic() + 60
        while not fault_proxy.stalled():  # the request is held: the run is in the middle of it
            assert proc.poll() is None and time.monotonic() < deadline, "the request never started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        fault_proxy.release()
    return proc.returncode, out, err


def test_json_says_a_run_was_interrupted(fault_proxy: FaultProxy) -> None:
    """SIGTERM (a CI job cancelled) in the middle of a registry read: with --json, stdout still
    carries one JSON document, and the exit code is SIGTERM's."""
    fault_proxy.stall(None, "/v2/", seconds=60, times=100)
    code, out, err = _terminated_in_a_stall(fault_proxy, ["inspect", "--json", f"{fault_proxy.host}/x/m:latest"])
    assert code == 128 + signal.SIGTERM, err
    assert json.loads(out) == {"error": INTERRUPTED} and INTERRUPTED in err


def test_an_interrupted_mirror_into_an_archive_ends_at_once_and_says_so_in_json(
    cli: Cli, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    """A blob in the middle of its copy into the archive holds the archive's lock: the main thread,
    giving the archive up, waited for it until the grace timer ended the process, with no JSON
    document on stdout. It gives up without waiting now (the partial file goes with the process),
    and the timer's exit prints the document too, should anything else hold the main thread."""
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(os.urandom(LARGE_FILE))
    cat = write_catalog(tmp_path / "catalog.yaml", "models:\n  - name: m\n    path: ./m\n")
    cli("build", "-c", cat, "--push", "--registry", f"{fault_proxy.host}/mc")
    fault_proxy.stall("GET", "/blobs/sha256:", seconds=60, times=100)
    archive = tmp_path / "out.tar"
    argv = ["mirror", "-c", str(cat), "--json", "--from", f"{fault_proxy.host}/mc", "--to", f"oci-archive:{archive}"]
    code, out, err = _terminated_in_a_stall(fault_proxy, argv)  # a blob's copy has begun, and waits
    assert code == 128 + signal.SIGTERM, err
    assert json.loads(out) == {"error": INTERRUPTED} and err.count(INTERRUPTED) == 1, err
    assert not archive.exists()
    # the main thread gave the archive up (its partial file gone), not the grace timer's exit
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_the_grace_timer_s_exit_prints_the_json_document_too(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Where the main thread does not unwind within the grace (a transfer in flight it waits on),
    the timer ends the process: with --json, stdout gets its one document all the same."""
    from modelcar import cli as cli_module

    def exited(code: int) -> None:
        raise SystemExit(code)

    monkeypatch.setattr(cli_module.os, "_exit", exited)
    monkeypatch.setattr(cli_module, "_json_run", [True])
    monkeypatch.setattr(cli_module, "_printed", [])
    with pytest.raises(SystemExit, match="143"):
        cli_module._exit_after(0, 143)
    out, err = capsys.readouterr()
    assert json.loads(out) == {"error": INTERRUPTED} and err == INTERRUPTED + "\n"
    monkeypatch.setattr(cli_module, "_json_run", [False])
    with pytest.raises(SystemExit):
        cli_module._exit_after(0, 130)
    assert capsys.readouterr().out == ""
