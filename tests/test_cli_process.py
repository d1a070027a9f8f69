"""The ``vmbus`` console script as real processes: demo, signals, a served mock, a closed pipe."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import pytest
from click.testing import CliRunner

from pyvmbus.cli import main

_SCRIPT = Path(sys.executable).with_name("vmbus")
VMBUS = [str(_SCRIPT)] if _SCRIPT.exists() else [
    sys.executable, "-c", "import sys; from pyvmbus.cli import main; sys.exit(main(prog_name='vmbus'))"]


def start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([*VMBUS, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)


def readline_raw(stream: IO[str], deadline: float) -> str | None:
    """One line from ``stream``'s pipe, read a byte at a time; None at the deadline, "" at EOF.

    Never ``select`` then ``stream.readline()``: readline reads the pipe in chunks, so a
    burst of lines (several log records written while this process was descheduled, as
    under CPU load) lands in the text wrapper's buffer, select sees an empty pipe, and the
    wait times out although the line came. Reading byte by byte leaves everything after the
    line in the pipe, for the next call and for ``communicate``.
    """
    fd = stream.fileno()
    line = bytearray()
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return None
        b = os.read(fd, 1)
        if not b:
            return line.decode()
        line += b
        if b == b"\n":
            return line.decode()


def read_json_until(stream: IO[str], event: str, timeout: float) -> list[dict[str, Any]]:
    """JSON lines from ``stream`` up to and including the first with ``event``."""
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while True:
        line = readline_raw(stream, deadline)
        if not line:
            break
        obj = json.loads(line)
        seen.append(obj)
        if obj.get("event") == event:
            return seen
    raise AssertionError(f"no {event!r} event within {timeout} s; got {seen}")


@pytest.mark.timeout(30)
def test_read_json_until_sees_lines_that_came_in_one_burst() -> None:
    # The stall once seen under CPU load in the fcopy-daemon SIGTERM test: the daemon had
    # logged the awaited line, but a select() + readline() reader had pulled it into its
    # buffer with the line before and then waited on an empty pipe. One write of two lines
    # makes that deterministic: the old reader timed out here.
    code = ("import sys, time; sys.stdout.write('{\"event\": \"a\"}\\n{\"event\": \"b\"}\\n'); "
            "sys.stdout.flush(); time.sleep(30)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        t0 = time.monotonic()
        assert [o["event"] for o in read_json_until(proc.stdout, "b", 10)] == ["a", "b"]
        assert time.monotonic() - t0 < 5
    finally:
        proc.kill()
        proc.communicate()


@pytest.mark.timeout(60)
def test_demo_as_a_process_finishes_in_seconds() -> None:
    t0 = time.monotonic()
    res = subprocess.run([*VMBUS, "demo"], capture_output=True, text=True, timeout=50,
                         stdin=subprocess.DEVNULL)
    took = time.monotonic() - t0
    assert res.returncode == 0, res.stdout + res.stderr
    assert took < 10, f"demo took {took:.1f} s"
    assert res.stderr == ""
    assert "reply" in res.stdout and "restored" in res.stdout


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_enable_stops_cleanly_on_a_signal(sig: signal.Signals) -> None:
    proc = start("--mock", "--json", "enable", "echo")
    try:
        assert proc.stdout is not None
        read_json_until(proc.stdout, "post_started", 30)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    evs = [json.loads(line) for line in out.splitlines()]
    names = [e["event"] for e in evs]
    assert names[-3:] == ["closed", "restored", "stopped"]
    assert evs[-1]["why"] == sig.name


@pytest.mark.timeout(60)
def test_mock_serve_for_other_processes(tmp_path: Path) -> None:
    root = tmp_path / "bus"
    proc = start("--json", "mock", "serve", "--root", str(root), "--device", "echo", "--device", "fcopy")
    try:
        assert proc.stdout is not None
        serving = read_json_until(proc.stdout, "serving", 30)[-1]
        assert serving["root"] == str(root)
        r = CliRunner().invoke(main, ["--root", str(root), "--json", "list"], prog_name="vmbus")
        assert r.exit_code == 0, r.output
        assert sorted(d["class"] for d in json.loads(r.stdout)["devices"]) == ["echo", "fcopy"]
        r = CliRunner().invoke(main, ["--root", str(root), "enable", "echo", "--send", "6869", "--count", "1",
                                      "--timeout", "10"], prog_name="vmbus")
        assert r.exit_code == 0, r.output
        assert "68 69 00 00 00 00 00 00  |hi......|" in r.stdout
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert json.loads(out.splitlines()[-1]) == {"event": "stopped", "t": pytest.approx(0, abs=60),
                                                "why": "SIGINT"}
    assert not root.exists()


@pytest.mark.timeout(60)
def test_closed_pipe_stops_a_stream_quietly() -> None:
    proc = start("--json", "demo")  # like 'vmbus --json demo | head -1'
    try:
        assert proc.stdout is not None and proc.stderr is not None
        read_json_until(proc.stdout, "demo", 30)
        proc.stdout.close()
        err = proc.stderr.read()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err


@pytest.mark.timeout(90)
def test_mock_fault_rescinds_a_device_under_a_running_enable(tmp_path: Path) -> None:
    root = tmp_path / "bus"
    serve = start("--json", "mock", "serve", "--root", str(root), "--device", "echo")
    enable: subprocess.Popen[str] | None = None
    try:
        assert serve.stdout is not None
        read_json_until(serve.stdout, "serving", 30)
        enable = start("--root", str(root), "--json", "enable", "echo")
        assert enable.stdout is not None
        guid = read_json_until(enable.stdout, "post_started", 30)[-1]["device"]
        r = CliRunner().invoke(main, ["--json", "mock", "fault", "echo", "rescind", "--root", str(root)],
                               prog_name="vmbus")
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout) == {"device": guid, "class": "echo", "kind": "rescind", "relid": None,
                                        "args": {}}
        out, err = enable.communicate(timeout=30)
        assert enable.returncode == 9, err  # the host's doing: exit 9, one line, no traceback
        assert "rescinded" in err and "Traceback" not in err and err.count("\n") == 1
        evs = [json.loads(line) for line in out.splitlines()]
        assert {"event": "closed", "reason": "rescinded"}.items() <= of_kind(evs, "closed").items()
        fault = read_json_until(serve.stdout, "fault", 10)[-1]
        assert fault["kind"] == "rescind" and fault["device"] == guid
        r = CliRunner().invoke(main, ["--root", str(root), "mock", "fault", guid[:8], "reoffer"],
                               prog_name="vmbus")
        assert r.exit_code == 0, r.output
        assert "offered again as relid" in r.stdout
        r = CliRunner().invoke(main, ["--root", str(root), "--json", "show", "echo"], prog_name="vmbus")
        assert r.exit_code == 0 and json.loads(r.stdout)["guid"] == guid
        r = CliRunner().invoke(main, ["--root", str(root), "mock", "fault", "nosuch", "stall"],
                               prog_name="vmbus")
        assert r.exit_code == 3 and "nosuch" in r.stderr and r.stderr.count("\n") == 1
        serve.send_signal(signal.SIGINT)
        serve.communicate(timeout=30)
    finally:
        for proc in (serve, enable):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    assert serve.returncode == 0


@pytest.mark.timeout(90)
def test_mock_fault_header_and_descriptor_from_the_shell(tmp_path: Path) -> None:
    """The host faults with arguments, as a fuzzing user types them: the enable ends corrupt."""
    root = tmp_path / "bus"
    serve = start("--json", "mock", "serve", "--root", str(root), "--device", "echo", "--device", "echo")
    procs: list[subprocess.Popen[str]] = [serve]
    try:
        assert serve.stdout is not None
        devices = read_json_until(serve.stdout, "serving", 30)[-1]["devices"]
        guids = [d["guid"] for d in devices]
        cases = [("header", ["--arg", "field=interrupt_mask", "--arg", "value=0x7"], "interrupt_mask=0x7"),
                 ("descriptor", ["--arg", "offset8=1", "--arg", "len8=4"], "offset8")]
        for guid, (kind, args, word) in zip(guids, cases, strict=True):
            enable = start("--root", str(root), "--json", "enable", guid)
            procs.append(enable)
            assert enable.stdout is not None
            read_json_until(enable.stdout, "post_started", 30)
            r = CliRunner().invoke(main, ["--json", "mock", "fault", guid, kind, *args, "--root", str(root)],
                                   prog_name="vmbus")
            assert r.exit_code == 0, r.output
            reply = json.loads(r.stdout)
            assert reply["kind"] == kind and reply["args"] == dict(a.split("=") for a in args[1::2])
            _, err = enable.communicate(timeout=30)
            assert enable.returncode == 9, err
            assert "corrupt" in err and word in err and "Traceback" not in err, err
        # the arguments are checked before anything is sent, each error naming the key
        bad = [("header", ["--arg", "value=1"], "needs --arg field"),
               ("header", ["--arg", "field=bogus", "--arg", "value=1"], "field must be one of"),
               ("header", ["--arg", "field=read_index"], "exactly one of"),
               ("descriptor", ["--arg", "offset8=x", "--arg", "len8=4"], "offset8 must be a number"),
               ("stall", ["--arg", "count=3"], "takes no --arg"),
               ("storm", ["--arg", "count"], "KEY=VALUE"),
               ("storm", ["--arg", "count=0"], "between 1 and")]
        for kind, args, says in bad:
            r = CliRunner().invoke(main, ["mock", "fault", guids[0], kind, *args, "--root", str(root)],
                                   prog_name="vmbus")
            assert r.exit_code == 2 and says in r.stderr, (kind, args, r.stderr)
        serve.send_signal(signal.SIGINT)
        serve.communicate(timeout=30)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert serve.returncode == 0


def of_kind(evs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    return next(e for e in evs if e["event"] == kind)


def test_mock_fault_needs_a_served_root(tmp_path: Path) -> None:
    r = fault_cli("echo", "rescind", env={"VMBUS_ROOT": ""})
    assert r.exit_code == 2 and "--root DIR" in r.stderr
    r = fault_cli("echo", "rescind", "--root", str(tmp_path))
    assert r.exit_code == 10 and "vmbus mock serve --root" in r.stderr
    (tmp_path / "sys" / "bus" / "vmbus").mkdir(parents=True)
    r = fault_cli("echo", "crash", "--root", str(tmp_path))
    assert r.exit_code == 10 and "no 'vmbus mock serve' answers" in r.stderr
    r = fault_cli("echo", "explode", "--root", str(tmp_path))
    assert r.exit_code == 2 and "rescind" in r.stderr


def fault_cli(*args: str, env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(main, ["mock", "fault", *args], prog_name="vmbus", env=env)
