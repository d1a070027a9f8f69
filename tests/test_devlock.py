"""One user per device (pyvmbus.devlock): two real processes, through the mock.

The mock, like the kernel, lets two processes open a node and share the channel; the
refusal here is pyvmbus's own lock, taken by the same code on a real guest. Each second
user is a child process (tests/devlock_child.py) driven one command a line, so a race is
two children woken by commands written back to back.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from conftest import until
from pyvmbus import Vmbus, devlock
from pyvmbus.binding import bind, read_record, restore, unbind
from pyvmbus.channel import Channel
from pyvmbus.cli import main as cli_main
from pyvmbus.cli.errors import EXIT_BUSY
from pyvmbus.errors import AlreadyBound, DeviceBusy, NotPermitted, VmbusError
from pyvmbus.lifecycle import ChannelState
from pyvmbus.mock import MockVmbus
from pyvmbus.sysfs import UIO_DRIVER, Sysfs
from pyvmbus.uio import UioDevice, lock_key

CHILD = Path(__file__).with_name("devlock_child.py")
pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def _no_ssh(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SSH_CONNECTION", raising=False)


class Child:
    """A second process using the device: see devlock_child.py for its commands."""

    def __init__(self, root: Path, guid: str, log: Path) -> None:
        self.log = open(log, "ab")  # noqa: SIM115 - closed in close()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        self.proc = subprocess.Popen([sys.executable, "-u", str(CHILD), str(root), guid], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.pid = int(self.read()["ready"])

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put("")

    def send(self, cmd: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()

    def read(self, timeout: float = 60) -> dict[str, Any]:
        line = self.lines.get(timeout=timeout)
        if not line:
            raise AssertionError(f"child {self.proc.pid} ended: see {self.log.name}")
        return dict(json.loads(line))

    def ask(self, cmd: str) -> dict[str, Any]:
        self.send(cmd)
        return self.read()

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send("quit")
                self.proc.wait(timeout=15)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.close()


@pytest.fixture()
def children(tmp_path: Path) -> Iterator[list[Child]]:
    made: list[Child] = []
    yield made
    for c in made:
        c.close()


def spawn(made: list[Child], mock: MockVmbus, guid: str, tmp_path: Path) -> Child:
    c = Child(mock.root, guid, tmp_path / f"child{len(made)}.log")
    made.append(c)
    return c


def race(a: Child, cmd_a: str, b: Child, cmd_b: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Both children blocked on their next line: write both lines back to back."""
    a.send(cmd_a)
    b.send(cmd_b)
    return a.read(), b.read()


# -- two processes --------------------------------------------------------------------------------
def test_enable_while_another_process_holds_the_device(tmp_path: Path, children: list[Child]) -> None:
    with MockVmbus() as mock:
        guid = mock.add_device("echo")
        bind(mock.root, guid)
        a = spawn(children, mock, guid, tmp_path)
        assert a.ask("enable 50 a") == {"ok": True, "requests": 50, "wrong": []}
        ch = Vmbus(mock.root).channel(guid)
        with pytest.raises(DeviceBusy) as info:
            ch.enable()
        e = info.value
        assert e.pid == a.pid and e.role == "open" and not e.this_process
        assert e.command is not None and "devlock_child.py" in e.command
        assert e.device == guid and e.lock == str(devlock.lock_path(mock.root, guid).resolve())
        assert f"pid {a.pid}" in str(e) and "holds it open" in str(e) and f"kill {a.pid}" in str(e)
        assert ch.state is ChannelState.DISABLED  # nothing half-open
        # The holder's channel was not touched: its requests still come back as its own.
        assert a.ask("enable 0 x")["error"] == "DeviceBusy"  # a second Channel in one process too
        assert a.ask("disable") == {"ok": True}
        ch.enable()  # free now: the same Channel object enables
        try:
            assert ch.send_request(b"mine", timeout=10).rstrip(b"\0") == b"mine"
            busy = a.ask("enable 1 a")
            assert busy["error"] == "DeviceBusy" and busy["pid"] == os.getpid() and busy["role"] == "open"
        finally:
            ch.disable()


@pytest.mark.parametrize("kernel", ["6.18", "5.15"])
def test_two_enables_at_once_one_wins_and_keeps_its_own_replies(
        kernel: str, tmp_path: Path, children: list[Child]) -> None:
    with MockVmbus(kernel=kernel) as mock:
        guid = mock.add_device("echo", monitored=True)
        bind(mock.root, guid)
        a = spawn(children, mock, guid, tmp_path)
        b = spawn(children, mock, guid, tmp_path)
        wins = {a.pid: 0, b.pid: 0}
        for trial in range(10):
            ra, rb = race(a, f"enable 40 a{trial}", b, f"enable 40 b{trial}")
            results = {a.pid: ra, b.pid: rb}
            ok = [pid for pid, r in results.items() if r.get("ok")]
            assert len(ok) == 1, results
            winner = ok[0]
            loser = b.pid if winner == a.pid else a.pid
            assert results[winner] == {"ok": True, "requests": 40, "wrong": []}
            assert results[loser]["error"] == "DeviceBusy" and results[loser]["pid"] == winner
            wins[winner] += 1
            assert (a if winner == a.pid else b).ask("disable") == {"ok": True}
        assert sum(wins.values()) == 10


@pytest.mark.parametrize("device", ["heartbeat", "echo"])
def test_two_binds_at_once_never_both_succeed(device: str, tmp_path: Path, children: list[Child]) -> None:
    with MockVmbus(kernel="6.18") as mock:
        guid = mock.add_device(device)
        previous = Sysfs(mock.root).device(guid).driver
        a = spawn(children, mock, guid, tmp_path)
        b = spawn(children, mock, guid, tmp_path)
        for _ in range(20):
            ra, rb = race(a, "bind", b, "bind")
            ok = [r for r in (ra, rb) if "ok" in r]
            refused = [r for r in (ra, rb) if "error" in r]
            assert len(ok) == 1 and len(refused) == 1, (ra, rb)
            assert refused[0]["error"] == "AlreadyBound", refused  # it waited, then saw it bound
            dev = Sysfs(mock.root).device(guid)
            assert dev.driver == UIO_DRIVER and dev.uio_name == ok[0]["ok"]
            rec = read_record(mock.root, guid)
            assert rec is not None and rec.previous_driver == previous
            assert restore(mock.root, guid) == previous
            assert read_record(mock.root, guid) is None


def test_bind_racing_restore_ends_in_one_consistent_state(tmp_path: Path, children: list[Child]) -> None:
    with MockVmbus(kernel="6.18") as mock:
        guid = mock.add_device("heartbeat")
        a = spawn(children, mock, guid, tmp_path)
        b = spawn(children, mock, guid, tmp_path)
        orders = set()
        for _ in range(20):
            bind(mock.root, guid)
            rr, rb = race(a, "restore", b, "bind")
            assert rr == {"ok": "hv_utils"}, rr  # the restore always has something to undo
            dev = Sysfs(mock.root).device(guid)
            if "ok" in rb:  # the restore ran first, then the bind
                orders.add("restore, bind")
                assert dev.driver == UIO_DRIVER and dev.uio_name == rb["ok"]
                assert read_record(mock.root, guid) is not None
                assert restore(mock.root, guid) == "hv_utils"
            else:  # the bind ran first, found it bound, and the restore undid that bind
                orders.add("bind, restore")
                assert rb["error"] == "AlreadyBound", rb
                assert dev.driver == "hv_utils" and read_record(mock.root, guid) is None
            assert dev.driver_override is None
        assert orders  # which orders happened depends on the scheduler; both are consistent


def test_unbind_and_restore_of_a_device_held_open_are_refused(tmp_path: Path, children: list[Child]) -> None:
    with MockVmbus() as mock:
        guid = mock.add_device("heartbeat")
        bind(mock.root, guid)
        a = spawn(children, mock, guid, tmp_path)
        assert a.ask("enable 0 x")["ok"]
        for call in (restore, unbind):
            with pytest.raises(DeviceBusy) as info:
                call(mock.root, guid, timeout=30)
            assert info.value.pid == a.pid and info.value.role == "open"
            assert info.value.waited == 0  # refused at once, not after the timeout
        assert Sysfs(mock.root).device(guid).driver == UIO_DRIVER
        assert read_record(mock.root, guid) is not None
        with pytest.raises(DeviceBusy):
            bind(mock.root, guid)
        assert a.ask("disable") == {"ok": True}
        assert restore(mock.root, guid) == "hv_utils"


def test_kill_9_of_the_holder_frees_the_device(tmp_path: Path, children: list[Child]) -> None:
    with MockVmbus() as mock:
        guid = mock.add_device("echo")
        bind(mock.root, guid)
        a = spawn(children, mock, guid, tmp_path)
        assert a.ask("enable 5 a")["ok"]
        dead = a.pid
        a.kill9()
        line = json.loads(devlock.lock_path(mock.root, guid).read_text())
        assert line["pid"] == dead and line["role"] == "open"  # the dead holder's line stays ...
        ch = Vmbus(mock.root).channel(guid)
        ch.enable()  # ... and blocks nobody
        try:
            assert ch.send_request(b"after kill", timeout=10).rstrip(b"\0") == b"after kill"
            assert json.loads(devlock.lock_path(mock.root, guid).read_text())["pid"] == os.getpid()
        finally:
            ch.disable()
        assert devlock.lock_path(mock.root, guid).read_text() == ""  # released: no stale line


def test_kill_9_during_a_bind_frees_the_device(tmp_path: Path, children: list[Child]) -> None:
    with MockVmbus() as mock:
        guid = mock.add_device("heartbeat")
        a = spawn(children, mock, guid, tmp_path)
        assert a.ask("lock bind") == {"ok": True}  # as if killed inside bind()
        b = spawn(children, mock, guid, tmp_path)
        busy = b.ask("lock open")
        assert busy["error"] == "DeviceBusy" and busy["pid"] == a.pid and busy["role"] == "bind"
        a.kill9()
        assert bind(mock.root, guid).startswith("uio")
        assert restore(mock.root, guid) == "hv_utils"


def test_a_reservation_spans_bind_enable_and_restore(tmp_path: Path, children: list[Child]) -> None:
    with MockVmbus() as mock:
        guid = mock.add_device("heartbeat")
        bus = Vmbus(mock.root)
        a = spawn(children, mock, guid, tmp_path)
        with bus.reserve(guid) as hold:
            assert hold.held and hold.role == "reserve"
            busy = a.ask("bind")  # between our steps nobody else gets in
            assert busy["error"] == "DeviceBusy" and busy["pid"] == os.getpid() and busy["role"] == "reserve"
            bus.bind(guid)
            assert a.ask("enable 0 x")["role"] == "reserve"
            ch = bus.channel(guid)
            ch.enable()
            with pytest.raises(DeviceBusy) as info:  # one open at a time, also inside it
                bus.channel(guid).enable()
            assert info.value.this_process and info.value.role == "open"
            assert a.ask("restore")["role"] == "open"
            ch.disable()
            assert bus.restore(guid) == "hv_utils"
        assert not hold.held
        assert a.ask("reserve") == {"ok": True}
        with pytest.raises(DeviceBusy) as info:
            bus.bind(guid)
        assert info.value.pid == a.pid and info.value.role == "reserve"
        assert "has reserved it" in str(info.value)


def test_a_holder_that_writes_no_line_is_named_from_proc_locks(tmp_path: Path, children: list[Child]) -> None:
    if not Path("/proc/locks").exists():
        pytest.skip("no /proc/locks")
    with MockVmbus() as mock:
        guid = mock.add_device("echo")
        bind(mock.root, guid)
        a = spawn(children, mock, guid, tmp_path)
        assert a.ask("flock") == {"ok": True}
        path = devlock.lock_path(mock.root, guid)
        path.write_text(json.dumps({"pid": os.getpid(), "command": "a lie", "role": "bind"}) + "\n")
        with pytest.raises(DeviceBusy) as info:
            Vmbus(mock.root).channel(guid).enable()
        e = info.value
        assert e.pid == a.pid and e.role is None and e.command and "devlock_child.py" in e.command
        assert "holds it" in str(e)
        assert a.ask("release") == {"ok": True}
        with UioDevice.open(mock.root, mock.uio_name(guid), guid) as dev:
            assert dev.exclusive


def test_the_cli_says_busy_in_one_line_with_exit_12(tmp_path: Path, children: list[Child]) -> None:
    with MockVmbus() as mock:
        guid = mock.add_device("echo")
        a = spawn(children, mock, guid, tmp_path)
        assert a.ask("reserve") == {"ok": True}
        runner = CliRunner()
        for args in (["enable", "--count", "1", "echo"], ["bind", "echo"], ["restore", "echo"]):
            r = runner.invoke(cli_main, ["--root", str(mock.root), *args])
            assert r.exit_code == EXIT_BUSY == 12, (args, r.output, r.stderr)
            lines = r.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("vmbus: error: device ")
            assert f"pid {a.pid}" in lines[0] and "busy" in lines[0] and "Traceback" not in r.output
        assert Sysfs(mock.root).device(guid).driver is None  # nothing was bound
        r = runner.invoke(cli_main, ["--root", str(mock.root), "--json", "bind", "echo"])
        err = json.loads(r.stderr.strip().splitlines()[-1])
        assert err["type"] == "DeviceBusy" and err["exit_code"] == 12
        assert a.ask("release") == {"ok": True}
        r = runner.invoke(cli_main, ["--root", str(mock.root), "enable", "--count", "1", "--send", "6869",
                                     "echo"])
        assert r.exit_code == 0, r.output
        assert Sysfs(mock.root).device(guid).driver is None  # enable bound it and gave it back


def test_ring_map_looks_at_a_device_another_process_holds(tmp_path: Path, children: list[Child]) -> None:
    with MockVmbus() as mock:
        guid = mock.add_device("echo")
        bind(mock.root, guid)
        a = spawn(children, mock, guid, tmp_path)
        assert a.ask("enable 3 a")["ok"]
        r = CliRunner().invoke(cli_main, ["--root", str(mock.root), "--json", "ring", "--map", "echo"])
        assert r.exit_code == 0, r.output
        assert "open channel" in json.loads(r.stdout)["note"]


# -- one process ------------------------------------------------------------------------------------
def test_holds_in_one_process(tmp_path: Path) -> None:
    guid = "2d4af5e8-92ed-475d-92d6-c433252cfb81"
    with devlock.acquire(tmp_path, guid, "bind") as outer:
        with devlock.acquire(tmp_path, guid, "restore") as inner:  # a failed bind's roll-back
            assert inner.held
            assert json.loads(devlock.lock_path(tmp_path, guid).read_text())["role"] == "bind"
        assert outer.held
        other: list[BaseException] = []
        t = threading.Thread(target=lambda: other.append(_refusal(tmp_path, guid, "open")))
        t.start()
        t.join(30)
        assert isinstance(other[0], DeviceBusy) and other[0].this_process and other[0].role == "bind"
    with devlock.acquire(tmp_path, guid, "open") as opened:
        with pytest.raises(DeviceBusy) as info:
            devlock.acquire(tmp_path, guid, "restore", wait=5)
        assert info.value.this_process and info.value.role == "open" and info.value.waited == 0
        assert "disable() the other Channel" in str(info.value)
        assert opened.held
    assert devlock.lock_path(tmp_path, guid).read_text() == ""
    with pytest.raises(ValueError):
        devlock.acquire(tmp_path, guid, "write")
    with pytest.raises(ValueError):
        devlock.lock_path(tmp_path, "../etc/passwd")


def _refusal(root: Path, guid: str, role: str) -> BaseException:
    try:
        devlock.acquire(root, guid, role).release()
    except BaseException as exc:
        return exc
    raise AssertionError("not refused")


def test_a_bind_in_another_thread_is_waited_for(tmp_path: Path) -> None:
    guid = "2d4af5e8-92ed-475d-92d6-c433252cfb81"
    first = devlock.acquire(tmp_path, guid, "bind")
    waiting = threading.Event()
    got: list[devlock.DeviceLock] = []

    def second() -> None:
        waiting.set()
        got.append(devlock.acquire(tmp_path, guid, "unbind", wait=60))

    t = threading.Thread(target=second)
    t.start()
    waiting.wait(10)
    assert not got
    first.release()
    t.join(60)
    assert got and got[0].held and got[0].role == "unbind"
    got[0].release()


def test_a_forked_child_does_not_keep_the_lock(tmp_path: Path) -> None:
    guid = "2d4af5e8-92ed-475d-92d6-c433252cfb81"
    hold = devlock.acquire(tmp_path, guid, "open")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: not a holder; the parent's lock still stands
        try:
            os.close(r)
            try:
                devlock.acquire(tmp_path, guid, "open").release()
                msg = "acquired"
            except DeviceBusy as exc:
                msg = f"busy {exc.pid} {exc.this_process}"
            os.write(w, msg.encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        msg = f.read()
    os.waitpid(pid, 0)
    assert msg == f"busy {os.getpid()} False"
    hold.release()


def test_a_stale_line_of_a_dead_process_blocks_nobody(tmp_path: Path) -> None:
    guid = "2d4af5e8-92ed-475d-92d6-c433252cfb81"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True, timeout=30)
    path = devlock.lock_path(tmp_path, guid)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"pid": int(dead.stdout), "command": "gone", "role": "open"}) + "\n")
    assert devlock.holder(path).pid is None
    with devlock.acquire(tmp_path, guid, "open"):
        assert devlock.holder(path).pid == os.getpid()


def test_the_lock_directory_and_file_are_checked(tmp_path: Path) -> None:
    guid = "2d4af5e8-92ed-475d-92d6-c433252cfb81"
    devlock.acquire(tmp_path, guid, "open").release()
    d = devlock.lock_dir(tmp_path)
    assert d.stat().st_mode & 0o7777 == devlock.LOCK_DIR_MODE == 0o1770  # no world access
    path = devlock.lock_path(tmp_path, guid)
    assert path.stat().st_mode & 0o7777 == devlock.LOCK_FILE_MODE
    path.unlink()
    target = tmp_path / "precious"
    target.write_text("keep")
    path.symlink_to(target)
    with pytest.raises(VmbusError, match="symbolic link"):
        devlock.acquire(tmp_path, guid, "open")
    path.unlink()
    os.link(target, path)
    with pytest.raises(VmbusError, match="not a plain lock file"):
        devlock.acquire(tmp_path, guid, "open")
    assert target.read_text() == "keep"
    path.unlink()
    blocked = tmp_path / "ro"
    (blocked / "run").mkdir(parents=True)
    (blocked / "run" / "pyvmbus").write_text("a file where the directory goes")
    with pytest.raises(VmbusError):
        devlock.acquire(blocked, guid, "open")
    if os.geteuid() != 0:  # root passes every permission check
        (blocked / "run").chmod(0o500)
        with pytest.raises(NotPermitted):
            devlock.acquire(blocked / "x", guid, "open")


def test_the_lock_is_named_by_the_device_guid(tmp_path: Path) -> None:
    guid = "2d4af5e8-92ed-475d-92d6-c433252cfb81"
    assert lock_key(tmp_path, "uio3", "{2D4AF5E8-92ED-475D-92D6-C433252CFB81}") == guid
    link = tmp_path / "sys" / "class" / "uio" / "uio3"
    link.mkdir(parents=True)
    (link / "device").symlink_to(f"../../../{guid}")
    assert lock_key(tmp_path, "uio3") == guid  # from the node's device link
    assert lock_key(tmp_path, "uio4", "not a guid") == "uio-uio4"


def test_a_refused_enable_leaves_the_channel_disabled_and_usable(tmp_path: Path) -> None:
    with MockVmbus() as mock:
        guid = mock.add_device("echo")
        bind(mock.root, guid)
        first = Channel(mock.root, guid)
        first.enable()
        second = Channel(mock.root, guid)
        try:
            with pytest.raises(DeviceBusy):
                second.enable()
            assert second.state is ChannelState.DISABLED
            assert first.send_request(b"first", timeout=10).rstrip(b"\0") == b"first"
        finally:
            first.disable()
        second.enable()
        try:
            assert second.send_request(b"second", timeout=10).rstrip(b"\0") == b"second"
        finally:
            second.disable()
        assert until(lambda: devlock.lock_path(mock.root, guid).read_text() == "")
        with pytest.raises(AlreadyBound):
            bind(mock.root, guid)


def test_an_ic_service_keeps_the_device_for_its_whole_run(tmp_path: Path, children: list[Child]) -> None:
    from pyvmbus.ic.heartbeat import HeartbeatService
    from pyvmbus.ic.runner import run_service

    with MockVmbus() as mock:
        guid = mock.add_device("heartbeat")
        a = spawn(children, mock, guid, tmp_path)
        assert a.ask("reserve") == {"ok": True}
        with pytest.raises(DeviceBusy) as info:
            run_service(mock.root, guid, HeartbeatService(), timeout=5)
        assert info.value.pid == a.pid and info.value.action == "serve heartbeat"
        assert Sysfs(mock.root).device(guid).driver == "hv_utils"  # untouched
        assert a.ask("release") == {"ok": True}
        seen: dict[str, str] = {}

        def on_event(ev: Any) -> None:
            if ev.kind in ("bound", "enabled"):  # nobody else binds or restores meanwhile
                busy = a.ask("restore" if ev.kind == "bound" else "bind")
                seen[ev.kind] = f"{busy.get('error')} {busy.get('role')} {busy.get('pid')}"

        result = run_service(mock.root, guid, HeartbeatService(), timeout=1, on_event=on_event)
        assert result.restored_driver == "hv_utils"
        me = os.getpid()
        assert seen == {"bound": f"DeviceBusy reserve {me}", "enabled": f"DeviceBusy open {me}"}
        assert a.ask("bind")["ok"]  # and free again once it stopped


def test_an_enable_waits_for_a_bind_in_another_process(tmp_path: Path, children: list[Child]) -> None:
    with MockVmbus() as mock:
        guid = mock.add_device("echo")
        bind(mock.root, guid)
        a = spawn(children, mock, guid, tmp_path)
        assert a.ask("lock bind") == {"ok": True}  # a bind / restore in progress over there
        ch = Vmbus(mock.root).channel(guid)
        with pytest.raises(DeviceBusy) as info:
            ch.enable(timeout=0.3)  # the bind did not end within the enable's timeout
        assert info.value.role == "bind" and info.value.waited > 0 and "still busy after" in str(info.value)
        done: list[BaseException | None] = []

        def enable() -> None:
            try:
                ch.enable(timeout=60)
                done.append(None)
            except BaseException as exc:
                done.append(exc)

        t = threading.Thread(target=enable)
        t.start()
        assert a.ask("release") == {"ok": True}  # the bind ends: the waiting enable goes on
        t.join(60)
        try:
            assert done == [None]
            assert ch.send_request(b"waited", timeout=10).rstrip(b"\0") == b"waited"
        finally:
            ch.disable()


def test_the_lock_follows_the_device_not_its_node_name(tmp_path: Path, children: list[Child]) -> None:
    """A rescind removes the node and the next bind may reuse its uioN for another device:
    the old device's holder (still holding its rescinded channel) must not block that one."""
    with MockVmbus(kernel="6.18") as mock:
        old = mock.add_device("echo")
        name = bind(mock.root, old)
        a = spawn(children, mock, old, tmp_path)
        # A holder that has not closed yet (a Channel closes, and so unlocks, on the rescind;
        # a raw client or a slow teardown may not).
        assert a.ask("lock open") == {"ok": True}
        mock.rescind(old)
        assert until(lambda: not (mock.root / "dev" / name).exists())
        new = mock.add_device("echo")
        assert bind(mock.root, new) == name  # the same node name, another device
        ch = Vmbus(mock.root).channel(new)
        ch.enable()
        try:
            assert ch.send_request(b"new device", timeout=10).rstrip(b"\0") == b"new device"
        finally:
            ch.disable()
        assert devlock.holder(devlock.lock_path(mock.root, old)).pid == a.pid  # still its holder


def test_a_rescinded_channel_lets_go_of_the_device(tmp_path: Path, children: list[Child]) -> None:
    with MockVmbus(kernel="5.15") as mock:  # old kernels keep the device (and its GUID) after a rescind
        guid = mock.add_device("echo", monitored=True)
        bind(mock.root, guid)
        a = spawn(children, mock, guid, tmp_path)
        assert a.ask("enable 1 a")["ok"]
        assert devlock.holder(devlock.lock_path(mock.root, guid)).pid == a.pid
        mock.rescind(guid)  # the holder's channel closes ("rescinded") and so unlocks
        assert until(lambda: devlock.holder(devlock.lock_path(mock.root, guid)).pid is None, 10)
        mock.reoffer(guid)
        bind(mock.root, guid)
        ch = Vmbus(mock.root).channel(guid)
        ch.enable()  # the re-offered device: free for the next user
        try:
            assert ch.send_request(b"again", timeout=10).rstrip(b"\0") == b"again"
        finally:
            ch.disable()
