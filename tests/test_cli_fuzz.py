"""Fuzz the ``vmbus`` command line: hostile argument lists, and corrupted sysfs trees.

Properties, for every generated case:

- no traceback: the command ends with an exit code from the documented table
  (docs/cli.md, :data:`pyvmbus.cli.errors.EXIT_CODES`) and, on failure, one error line;
- no hang: it ends within the ``--timeout`` it was given plus a wide margin (a hang
  check, not a speed check; pytest-timeout is the backstop, and a few real processes
  run under a hard kill timeout);
- a refused command (a usage error, an unknown or ambiguous device, a permission error)
  changes nothing: the root's sys/ and run/ files are the same before and after.

Runs through click's CliRunner for speed. The default example counts keep the file to
tens of seconds; ``VMBUS_FUZZ_EXAMPLES=2000`` runs more.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvmbus import binding
from pyvmbus.cli import main
from pyvmbus.cli.errors import EXIT_CODES
from pyvmbus.cli.params import MAX_SECONDS
from pyvmbus.mock import ECHO_CLASS_GUID, MockVmbus
from pyvmbus.mock.sysfs_tree import SysfsTree
from pyvmbus.sysfs import UIO_DRIVER, Sysfs

HB = "abcd0001-079e-403c-b352-a1921ee207ee"
ECHO = "abcd0002-4cfa-4a6a-9e1b-e2a4b1a0b3c4"
NET = "f0000003-df3e-46c5-913f-f2d2f965ed0e"

EXAMPLES = int(os.environ.get("VMBUS_FUZZ_EXAMPLES", "0")) or None
CODES = {row.code for row in EXIT_CODES}
REFUSED = {2, 3, 4}
"""Exit codes of commands refused before they did anything (usage, not-found, permission)."""
MARGIN = 20.0
"""Seconds a command may run past the longest --timeout / --interval it was given."""

_SCRIPT = Path(sys.executable).with_name("vmbus")
VMBUS = [str(_SCRIPT)] if _SCRIPT.exists() else [
    sys.executable, "-c", "import sys; from pyvmbus.cli import main; sys.exit(main(prog_name='vmbus'))"]


def _examples(default: int) -> Any:
    return settings(max_examples=EXAMPLES or default, deadline=None, derandomize=EXAMPLES is None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# -- what a case must satisfy ------------------------------------------------------------------------
def invoke(argv: list[str]) -> tuple[Result, float]:
    t0 = time.monotonic()
    result = CliRunner().invoke(main, argv, prog_name="vmbus")
    return result, time.monotonic() - t0


def check(result: Result, elapsed: float, argv: list[str]) -> None:
    exc = result.exception
    assert exc is None or isinstance(exc, SystemExit), (
        f"vmbus {argv!r} raised {exc!r}\n{''.join(__import__('traceback').format_exception(exc))}")
    assert result.exit_code in CODES, (argv, result.exit_code, result.stderr)
    err = result.stderr
    assert "Traceback" not in err and "Traceback" not in result.stdout, (argv, err)
    if result.exit_code not in (0, 130):
        last = err.strip().splitlines()[-1] if err.strip() else ""
        assert last.startswith(("vmbus: error: ", "Error: ", '{"error"')), (argv, err)
        if last.startswith("vmbus: error: "):
            assert err.strip().count("\n") == 0 or "-v" in argv, (argv, err)
    limit = max([_seconds(v) for v in _timed_values(argv)] + [0.0]) + MARGIN
    assert elapsed < limit, f"vmbus {argv!r} ran {elapsed:.1f} s (limit {limit:.1f} s)"


def _timed_values(argv: list[str]) -> Iterator[str]:
    for opt, value in itertools.pairwise(argv):
        if opt in ("--timeout", "--interval", "--reply-timeout", "--reoffer-timeout"):
            yield value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        return 0.0
    return value if math.isfinite(value) and 0 < value <= MAX_SECONDS else 0.0


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under root/sys and root/run: kind and content (links: their target)."""
    out: dict[str, str] = {}
    for top in ("sys", "run"):
        base = root / top
        for dirpath, dirnames, filenames in os.walk(base):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                rel = str(p.relative_to(root))
                if rel.startswith("run/mock"):  # the mock's own logs and scratch files
                    continue
                st_ = p.lstat()
                if stat.S_ISLNK(st_.st_mode):
                    out[rel] = "link:" + os.readlink(p)
                elif stat.S_ISREG(st_.st_mode):
                    try:
                        out[rel] = "file:" + p.read_bytes()[:4096].decode("utf-8", "replace")
                    except OSError as exc:  # write-only attributes
                        out[rel] = f"file:<{exc.errno}>"
                else:
                    out[rel] = f"mode:{stat.S_IFMT(st_.st_mode):o}"
    return out


# -- hostile argument lists against a live mock --------------------------------------------------------
@pytest.fixture(scope="module")
def live() -> Iterator[MockVmbus]:
    with MockVmbus(devices=()) as m:
        m.add_device("heartbeat", instance=HB)
        m.add_device("echo", instance=ECHO)
        m.add_device("network", instance=NET)
        yield m


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("sends")
    (d / "big").write_bytes(b"x" * 100_000)      # over the echo ring, under a packet
    (d / "huge").write_bytes(b"x" * (1 << 20))   # over any packet
    (d / "small").write_bytes(b"hello")
    return {"big": f"@{d / 'big'}", "huge": f"@{d / 'huge'}", "small": f"@{d / 'small'}",
            "dir": f"@{d}", "zero": "@/dev/zero", "missing": f"@{d / 'missing'}", "empty": "@"}


NASTY = ["", " ", "-", "--", "-1", "0", "nan", "NaN", "inf", "-inf", "1e23", "1e309", "1e-320", "0x10",
         "abc", "\x00", "é", "../..", "x" * 300, "9" * 400, "--help", "-h", "--json", "--bogus", "-v"]
DEVICES = ["heartbeat", "echo", "network", "abcd", "ABCD0001", "{abcd0002", "abc", "f000", HB, ECHO.upper(),
           "{" + NET + "}", "nope", "scsi", "00000000-0000-0000-0000-000000000000"]


@st.composite
def seconds(draw: st.DrawFn) -> str:
    """Mostly valid and short (<= 0.3 s, so every case ends fast); one in six anything invalid."""
    if draw(st.integers(0, 5)):
        return draw(st.sampled_from(["0.05", "0.1", "0.2", "0.3"]))
    floats = st.floats(allow_nan=True, allow_infinity=True).filter(
        lambda f: not 0 < f <= MAX_SECONDS).map(repr)
    return draw(st.one_of(st.sampled_from(["0", "-1", "nan", "inf", "1e23", "abc", "", "0x1"]), floats))


def mostly(valid: list[str], invalid: list[str]) -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(valid), st.sampled_from(valid), st.sampled_from(valid),
                     st.sampled_from(invalid))


@st.composite
def argv_cases(draw: st.DrawFn, sends: dict[str, str]) -> list[str]:
    sec = seconds()
    dev = mostly(DEVICES, NASTY)
    count = mostly(["1", "2"], ["0", "-1", "x", "9" * 30])
    send = st.one_of(st.sampled_from(["00", "68656c6c6f", "0x00:01", "zz", "0" * 3]),
                     st.sampled_from(sorted(sends.values())))
    command = draw(st.sampled_from(["list", "show", "ring", "ring-watch", "bind", "unbind", "restore",
                                    "enable", "watch", "ic", "fault", "kvp", "capture"]))
    argv: list[str] = []
    if draw(st.booleans()):
        argv.append("--json")
    if command == "list":
        argv += ["list"]
    elif command == "show":
        argv += ["show", draw(dev)]
    elif command == "ring":
        argv += ["ring", draw(dev)]
    elif command == "ring-watch":
        # (no --timeout here: a valid --count must be small, or the case runs as long as asked)
        argv += ["ring", draw(dev), "--watch", "--count", draw(mostly(["1", "2"], ["0", "-1", "x", ""])),
                 "--interval", draw(sec)]
    elif command in ("bind", "unbind", "restore"):
        argv += [command, draw(dev), "--timeout", draw(sec)]
    elif command == "enable":
        argv += ["enable", draw(dev), "--timeout", draw(sec)]
        for _ in range(draw(st.integers(0, 2))):
            argv += ["--send", draw(send)]
        if draw(st.booleans()):
            argv += ["--reply-timeout", draw(sec)]
        if draw(st.booleans()):
            argv += ["--no-wait"]
        if draw(st.booleans()):
            argv += ["--count", draw(count)]
    elif command == "watch":
        argv += ["watch", "--poll", "--timeout", draw(sec), "--interval", draw(sec)]
    elif command == "ic":
        argv += ["ic", "heartbeat", draw(dev), "--timeout", draw(sec)]
        if draw(st.booleans()):
            argv += ["--reoffer-timeout", draw(sec)]
    elif command == "kvp":  # the pool files live outside sys/ and run/: get and list only read them
        argv += ["kvp", draw(st.sampled_from(["list", "get"]))]
        if argv[-1] == "get":
            argv.append(draw(mostly(["k", "IP"], NASTY)))
        if draw(st.booleans()):
            argv += ["--pool", draw(mostly(["0", "1", "4"], ["5", "-1", "x", ""]))]
        pool_dirs = [sends["dir"][1:], "/dev/null", "/proc", "/nonexistent"]
        argv += ["--pool-dir", draw(st.sampled_from(pool_dirs))]
    elif command == "capture":
        argv += ["capture", "show", draw(st.sampled_from([v[1:] for v in sends.values()] + ["/dev/null"]))]
    elif command == "fault":
        argv += ["mock", "fault", draw(dev), draw(st.sampled_from(["rescind", "stall", "header", "descriptor",
                                                                   "bogus", ""]))]
        for _ in range(draw(st.sampled_from([0, 1, 2]))):
            argv += ["--arg", draw(mostly(["field=read_index", "value=8", "len8=4", "offset8=0x1", "count=2"],
                                          ["field", "=1", "value=-1", "len8=1e9", "x=y", *NASTY]))]
    # Stray tokens where the parser may least expect them (never one that lengthens a wait).
    for _ in range(draw(st.sampled_from([0, 0, 0, 0, 1, 2]))):
        argv.insert(draw(st.integers(0, len(argv))), draw(st.sampled_from(NASTY)))
    return argv


def _put_back(root: Path, original: dict[str, str | None]) -> None:
    fs = Sysfs(root)
    for guid, driver in original.items():
        dev = fs.device(guid)
        if dev.driver != driver or binding.read_record(root, guid) is not None:
            binding.restore(root, guid, timeout=10)


@pytest.mark.timeout(600)
@_examples(60)
@given(data=st.data())
def test_hostile_argument_lists(live: MockVmbus, files: dict[str, str], data: st.DataObject) -> None:
    argv = ["--root", str(live.root), *data.draw(argv_cases(files), label="argv")]
    if "fault" in argv and "--root" not in argv[3:]:
        argv += ["--root", str(live.root)]  # mock fault's own --root: without a serve it is not served
    original = {d.guid: d.driver for d in Sysfs(live.root).devices()}
    before = snapshot(live.root)
    result, elapsed = invoke(argv)
    if os.environ.get("VMBUS_FUZZ_SHOW"):
        print(f"{result.exit_code:3d} {elapsed:5.2f}s {argv[2:]!r:.150}")
    try:
        check(result, elapsed, argv)
        if result.exit_code in REFUSED:
            after = snapshot(live.root)
            changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
            assert not changed, f"vmbus {argv!r} was refused (exit {result.exit_code}) but changed {changed}"
    finally:
        _put_back(live.root, original)


# -- corrupted sysfs trees ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A static tree (no mock kernel): heartbeat bound to uio_hv_generic with a ring, echo and
    network bound to their drivers."""
    root = tmp_path_factory.mktemp("tree")
    t = SysfsTree(root, "6.18")
    t.add_device("heartbeat", HB, monitored=True)
    t.add_device(ECHO_CLASS_GUID, ECHO)
    t.add_device("network", NET)
    relid = Sysfs(root).device(HB).relid
    t.set_driver(HB, UIO_DRIVER)
    t.add_uio(HB, 0, t.uio_maps(HB))
    t.set_ring_allocated(HB, relid, 0x4000)
    return root


def _entries(root: Path) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root / "sys"):
        for name in dirnames + filenames:
            out.append(str((Path(dirpath) / name).relative_to(root)))
    return sorted(out)


VALUES = ["", "\n", "abc", "-1", "-0x10", "0x", "1_0", "2" * 100, str(2 ** 70), "1.5", "\x00\x00", "é",
          "{zz}", "3\n4", "7 junk", "0" * 70, "00000000-0000-0000-0000-00000000000g"]


def _corrupt(path: Path, how: str, value: str) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)
    if how == "text":
        path.write_text(value)
    elif how == "huge":
        with open(path, "wb") as f:
            f.truncate(8 << 20)
    elif how == "dir":
        path.mkdir()
    elif how == "loop":
        os.symlink(path.name, path)
    elif how == "dangling":
        os.symlink("nowhere", path)
    # "missing": leave it removed


@pytest.mark.timeout(600)
@_examples(120)
@given(data=st.data())
def test_corrupted_sysfs_trees(base_tree: Path, data: st.DataObject) -> None:
    entries = _entries(base_tree)
    with tempfile.TemporaryDirectory(prefix="vmbus-fuzz-") as tmp:
        root = Path(tmp) / "root"
        shutil.copytree(base_tree, root, symlinks=True)
        for _ in range(data.draw(st.integers(1, 3), label="corruptions")):
            rel = data.draw(st.sampled_from(entries), label="entry")
            how = data.draw(st.sampled_from(["text", "text", "text", "huge", "dir", "loop", "dangling",
                                             "missing"]), label="how")
            value = data.draw(st.one_of(st.sampled_from(VALUES), st.text(max_size=20)), label="value")
            with contextlib.suppress(OSError):  # a parent an earlier corruption removed or replaced
                _corrupt(root / rel, how, value)
        query = data.draw(st.sampled_from(["heartbeat", HB, "echo", "network", "abcd", "f000"]),
                          label="dev")
        command = data.draw(st.sampled_from([["list"], ["show", query], ["ring", query],
                                             ["watch", "--poll", "--timeout", "0.1", "--interval", "0.02"]]),
                            label="command")
        json_mode = data.draw(st.booleans(), label="json")
        argv = ["--root", str(root), *(["--json"] if json_mode else []), *command]
        before = snapshot(root)
        result, elapsed = invoke(argv)
        check(result, elapsed, argv)
        assert snapshot(root) == before, f"read-only vmbus {argv!r} changed the tree"


# -- real processes, hard-killed if they hang ----------------------------------------------------------
@pytest.mark.timeout(120)
@pytest.mark.parametrize("args", [
    ["watch", "--poll", "--interval", "60", "--timeout", "0.5"],
    ["enable", "echo", "--timeout", "nan", "--count", "1"],
    ["enable", "echo", "--timeout", "1e23", "--count", "1"],
    ["ring", "echo", "--watch", "--interval", "inf", "--count", "2"],
    ["enable", "echo", "--send", "@/dev/zero", "--timeout", "1"],
])
def test_no_hang_in_a_real_process(live: MockVmbus, args: list[str]) -> None:
    original = {d.guid: d.driver for d in Sysfs(live.root).devices()}
    try:
        p = subprocess.run([*VMBUS, "--root", str(live.root), *args], capture_output=True, text=True,
                           timeout=40, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        pytest.fail(f"vmbus {args!r} still ran after 40 s")
    finally:
        _put_back(live.root, original)
    assert "Traceback" not in p.stderr, p.stderr
    assert p.returncode in CODES, (p.returncode, p.stderr)
