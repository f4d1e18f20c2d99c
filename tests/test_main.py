"""The `modelcar` entry point itself, in a fresh interpreter."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from modelcar import __version__
from tests.conftest import Cli, write_catalog


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
        for option in (r"--catalog\s+-c\b", r"--json\b", r"--verbose\s+-v\b"):
            assert re.search(option, text), (name, option)


def test_plan_json_is_format_json(cli: Cli, tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    cat = write_catalog(tmp_path / "catalog.yaml", "models:\n  - name: m\n    path: ./m\n")
    cli("lock", "-c", cat)
    assert cli("plan", "-c", cat, "--json").stdout == cli("plan", "-c", cat, "--format", "json").stdout
    assert "--json is --format json" in cli("plan", "-c", cat, "--json", "--format", "k8s-job", code=2).stderr


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
