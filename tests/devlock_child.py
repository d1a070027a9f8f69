"""A second user of a device, in its own process, for tests/test_devlock.py.

Run as ``python devlock_child.py ROOT GUID``. It prints ``{"ready": pid}`` and then reads
one command a line from stdin, answering each with one JSON line on stdout:

- ``enable N TAG``: enable a Channel, send N requests ``TAG:i`` and check every reply is
  that request's own bytes; the channel stays enabled. -> ``{"ok": true, "requests": N,
  "wrong": [...]}`` or the error.
- ``disable``: disable the channel. ``bind`` / ``unbind`` / ``restore``: the binding call
  (``{"ok": <its result>}``). ``reserve``: ``Vmbus.reserve`` (kept until ``release``).
- ``lock ROLE``: take the device lock for ROLE directly and keep it.
- ``flock``: flock the lock file through a read-only fd of its own, writing no line (a
  holder that may not write the file), and keep it.
- ``quit``: exit.

An error answers ``{"error": class name, "message": ..., "pid": ..., "command": ...,
"role": ...}`` (the last three from :class:`DeviceBusy`).
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
from typing import Any

from pyvmbus import Vmbus, devlock
from pyvmbus.binding import bind, restore, unbind
from pyvmbus.channel import Channel
from pyvmbus.errors import DeviceBusy


def _say(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _requests(ch: Channel, n: int, tag: str) -> dict[str, Any]:
    wrong = []
    for i in range(n):
        payload = f"{tag}:{i}".encode()
        reply = ch.send_request(payload, timeout=10)
        if reply.rstrip(b"\0") != payload:
            wrong.append([payload.decode(), reply.hex()])
    return {"ok": True, "requests": n, "wrong": wrong}


def main() -> None:
    root, guid = sys.argv[1], sys.argv[2]
    bus = Vmbus(root)
    ch: Channel | None = None
    held: list[Any] = []
    _say({"ready": os.getpid()})
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        cmd = words[0]
        try:
            if cmd == "quit":
                return
            if cmd == "enable":
                new = bus.channel(guid)
                new.enable()
                ch = new  # only an enabled one replaces the one "disable" acts on
                _say(_requests(ch, int(words[1]), words[2]))
            elif cmd == "disable":
                if ch is not None:
                    ch.disable()
                _say({"ok": True})
            elif cmd == "bind":
                _say({"ok": bind(root, guid, timeout=20)})
            elif cmd == "unbind":
                _say({"ok": unbind(root, guid, timeout=20)})
            elif cmd == "restore":
                _say({"ok": restore(root, guid, timeout=20)})
            elif cmd == "reserve":
                held.append(bus.reserve(guid))
                _say({"ok": True})
            elif cmd == "lock":
                held.append(devlock.acquire(root, bus.device(guid).guid, words[1]))
                _say({"ok": True})
            elif cmd == "flock":
                path = devlock.lock_path(root, bus.device(guid).guid)
                devlock.lock_dir(root).mkdir(parents=True, exist_ok=True)
                path.touch()
                fd = os.open(path, os.O_RDONLY)
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held.append(fd)
                _say({"ok": True})
            elif cmd == "release":
                for h in held:
                    if isinstance(h, int):
                        os.close(h)
                    else:
                        h.release()
                held.clear()
                _say({"ok": True})
            else:
                _say({"error": "unknown command", "message": cmd})
        except DeviceBusy as exc:
            _say({"error": "DeviceBusy", "message": str(exc), "pid": exc.pid, "command": exc.command,
                  "role": exc.role})
        except Exception as exc:
            _say({"error": type(exc).__name__, "message": str(exc)})


if __name__ == "__main__":
    main()
