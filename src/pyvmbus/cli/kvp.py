"""``vmbus ic kvp`` (serve Data Exchange) and ``vmbus kvp get|set|delete|list`` (the pools) (issue 13).

``vmbus ic kvp`` runs :class:`~pyvmbus.ic.kvp.KvpService` in the foreground like the other
``vmbus ic`` commands (bind if needed, serve until Ctrl-C / SIGTERM / ``--count`` /
``--timeout``, survive rescinds, give the device back), over the hv_kvp_daemon pool files
in ``<root>/var/lib/hyperv`` (``--pool-dir`` elsewhere). It refuses to start while a
running hv_kvp_daemon owns those pools.

``vmbus kvp ...`` reads and writes the same files from the shell with the daemon's
locking, whether pyvmbus, hv_kvp_daemon or nothing serves the host: ``set`` and ``delete``
work on pool 1 (the guest's own, which the host reads) unless ``--pool`` says otherwise,
``get`` looks in every pool unless ``--pool`` is given, ``list`` shows every record.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from ..errors import UsageError
from ..ic import KvpEvent, KvpService
from ..ic.kvp_pool import DEFAULT_POOL_DIR, POOL_COUNT, KvpPoolError, KvpPools, check_key, check_value
from ..ic.kvp_system import KvpNetwork
from ..ic.messages import KvpOp
from .ic import IcSession, acts_on_this_machine, emit_summary, ic, ic_device, ic_options, render_ic_event
from .output import Output, stamp, table
from .params import SafePath
from .state import CliState, json_option

__all__ = ["KvpKeyNotFound", "ic_kvp", "kvp", "pool_dir_for", "register", "render_kvp_event"]

_log = logging.getLogger("pyvmbus.cli.kvp")
_F = TypeVar("_F", bound=Callable[..., Any])

_POOL_NAMES = {0: "external (host)", 1: "guest", 2: "auto (intrinsic)", 3: "auto external",
               4: "auto internal"}


class KvpKeyNotFound(UsageError, LookupError):
    """``vmbus kvp get`` / ``delete`` of a key that no pool (or not the given one) holds."""

    def __init__(self, key: str, pools: list[int]) -> None:
        where = f"pool {pools[0]}" if len(pools) == 1 else "any pool"
        super().__init__(f"no key {key!r} in {where}; 'vmbus kvp list' shows the keys")
        self.key = key
        self.pools = pools


def pool_dir_for(state: CliState, pool_dir: Path | None) -> Path:
    """``--pool-dir``, else /var/lib/hyperv under the root (``--root``, the mock's, or /)."""
    if pool_dir is not None:
        return pool_dir
    if state.mock:
        return state.root() / DEFAULT_POOL_DIR.lstrip("/")
    root = state.root_option if state.root_option is not None else Path("/")
    return root / DEFAULT_POOL_DIR.lstrip("/")


_POOL_DIR = click.option("--pool-dir", type=SafePath(file_okay=False, path_type=Path), default=None,
                         metavar="DIR", help="Where the .kvp_pool_0..4 files are [default: "
                                             "/var/lib/hyperv under the root].")


# -- vmbus ic kvp ---------------------------------------------------------------------------------

def render_kvp_event(ev: dict[str, Any]) -> str:
    """One text line for a ``kvp`` event of ``vmbus ic kvp``."""
    s = stamp(ev)
    if ev["event"] != "kvp":
        return render_ic_event(ev)
    kind, op = ev["kind"], ev["op"]
    where = f"pool {ev['pool']} " if ev["pool"] is not None else ""
    key = f"{ev['key']!r} " if ev["key"] else ""
    if kind in ("set", "get"):
        what = f"{where}{key}= {ev['value'][:80]!r}"
    elif kind == "enumerated":
        what = f"{where}({ev['count']} record(s))"
    elif kind in ("ip_get", "ip_set"):
        what = f"{key}{ev['value']}"
    elif kind == "refused":
        what = f"{op} {where}{key}"
    else:
        what = f"{op} {where}{key}" if kind == "missing" else f"{where}{key}"
    extra = f": {ev['reason']}" if ev["reason"] else ""
    return f"{s}kvp       {kind:<10} {what.rstrip()} -> {ev['status']}{extra}"


@click.command("kvp")
@click.argument("device", default="kvp")
@_POOL_DIR
@click.option("--kvp-scripts", type=SafePath(file_okay=False, path_type=Path), default=None, metavar="DIR",
              help="Where hv_get_dhcp_info, hv_get_dns_info and hv_set_ifconfig are [default: PATH, "
                   "then /usr/libexec/hypervkvpd]. Without them IP injection is answered 'not supported'.")
@click.option("--no-auto-pool-file", is_flag=True,
              help="Do not write the intrinsic values the host read into pool 2's file.")
@ic_options
@click.pass_obj
def ic_kvp(state: CliState, device: str, pool_dir: Path | None, kvp_scripts: Path | None,
           no_auto_pool_file: bool, no_bind: bool, force: bool, count: int | None, timeout: float | None,
           reoffer_timeout: float | None) -> None:
    """Serve Data Exchange (KVP) over the hv_kvp_daemon pool files, in its place.

    The host sets and deletes keys (pool 0), reads the guest's pool (1) and the intrinsic
    values (pool 2: host name, OS, addresses ...), and asks for or injects IP settings
    through the daemon's helper scripts. Refuses to start while hv_kvp_daemon owns the pools.
    """
    out = Output(state.json)
    session = IcSession(state, out)
    dev = ic_device(state, device, KvpService)
    directory = pool_dir_for(state, pool_dir)
    handled = [0]

    def on_event(e: KvpEvent) -> None:
        handled[0] += 1
        level = logging.WARNING if e.kind == "refused" else logging.INFO
        _log.log(level, "%s", e)
        ev = {"event": "kvp", "t": 0.0, "device": session.guid, **e.as_dict()}
        ev["pool"] = e.pool if e.pool >= 0 else None
        session_ev(ev)

    def session_ev(ev: dict[str, Any]) -> None:
        ev["t"] = round(time.monotonic() - session.start, 3)
        out.emit(ev, lambda: render_kvp_event(ev))

    root = state.root()
    pools = KvpPools(directory)
    try:
        # On a mock or another --root bus, adapters are looked up under that root (a mock has
        # none): a host request never reconfigures this machine's network from there.
        real = acts_on_this_machine(root)
        network = KvpNetwork(scripts_dir=kvp_scripts, config_dir=directory, root=root if not real else "/",
                             proc=root / "proc" if not real else "/proc")
        svc = KvpService(pools, network=network, publish_auto=not no_auto_pool_file, on_event=on_event)
        missing = [n for n, p in network.scripts.items() if p is None]
        if missing:
            out.echo(f"note: no {', '.join(missing)}: IP injection requests get 'not supported'", err=True)
        out.echo(f"serving kvp on {dev.guid} with the pools in {directory}; Ctrl-C to stop", err=True)
        try:
            session.run(dev, svc, bind=not no_bind, force=force, timeout=timeout, count=count,
                        done=lambda: handled[0], reoffer_timeout=reoffer_timeout)
        finally:
            ops = svc.ops
            emit_summary(session, svc, sets=ops[KvpOp.SET.name], gets=ops[KvpOp.GET.name],
                     deletes=ops[KvpOp.DELETE.name], enumerates=ops[KvpOp.ENUMERATE.name],
                     ip_requests=ops[KvpOp.GET_IP_INFO.name] + ops[KvpOp.SET_IP_INFO.name],
                     refused=ops["refused"], pool_dir=str(directory))
    finally:
        pools.close()


# -- vmbus kvp ... --------------------------------------------------------------------------------

def _pool_option(default: int | None, help_text: str) -> Callable[[_F], _F]:
    return click.option("--pool", type=click.IntRange(0, POOL_COUNT - 1), default=default, metavar="N",
                        show_default=default is not None, help=help_text)


def _checked(value: str, check: Any, what: str) -> None:
    try:
        check(value)
    except KvpPoolError as exc:
        raise click.BadParameter(str(exc), param_hint=what) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def kvp() -> None:
    """Read and write the KVP pool files (/var/lib/hyperv/.kvp_pool_0..4) with hv_kvp_daemon's locking.

    Pool 0: keys the host set; 1: the guest's own (the host reads it); 2: the intrinsic
    values; 3, 4: auto external / internal. Works whoever serves the host (pyvmbus,
    hv_kvp_daemon) or nobody.
    """


def _record(pool: int, key: bytes, value: bytes) -> dict[str, Any]:
    return {"pool": pool, "key": key.decode("utf-8", errors="replace"),
            "value": value.decode("utf-8", errors="replace")}


@kvp.command("list")
@_pool_option(None, "Only this pool [default: all].")
@_POOL_DIR
@json_option
@click.pass_obj
def kvp_list(state: CliState, pool: int | None, pool_dir: Path | None) -> None:
    """List the records of every pool (or of --pool N)."""
    out = Output(state.json)
    directory = pool_dir_for(state, pool_dir)
    rows = []
    with KvpPools(directory, create=False, check_daemon=False) as pools:
        for n in range(POOL_COUNT) if pool is None else (pool,):
            for r in pools.records(n):
                rows.append(_record(n, r.key, r.value))
    for row in rows:
        out.emit(row)
    if not state.json:
        if rows:
            click.echo(table(["POOL", "KEY", "VALUE"], [(r["pool"], r["key"], r["value"]) for r in rows],
                             right=[0]))
        else:
            where = "any pool" if pool is None else f"pool {pool} ({_POOL_NAMES[pool]})"
            click.echo(f"no records in {where} under {directory}", err=True)


@kvp.command("get")
@click.argument("key")
@_pool_option(None, "Only this pool [default: the first pool, 0..4, that has KEY].")
@_POOL_DIR
@json_option
@click.pass_obj
def kvp_get(state: CliState, key: str, pool: int | None, pool_dir: Path | None) -> None:
    """Print the value of KEY (exit 1 if no pool has it)."""
    _checked(key, check_key, "KEY")
    out = Output(state.json)
    order = list(range(POOL_COUNT)) if pool is None else [pool]
    with KvpPools(pool_dir_for(state, pool_dir), create=False, check_daemon=False) as pools:
        for n in order:
            value = pools.get(n, key)
            if value is not None:
                row = _record(n, key.encode(), value)
                out.emit(row, row["value"])
                return
    raise KvpKeyNotFound(key, order)


@kvp.command("set")
@click.argument("key")
@click.argument("value")
@_pool_option(1, "The pool to write (1: the guest's, which the host reads).")
@_POOL_DIR
@json_option
@click.pass_obj
def kvp_set(state: CliState, key: str, value: str, pool: int, pool_dir: Path | None) -> None:
    """Set KEY to VALUE (replace its record, or append one)."""
    _checked(key, check_key, "KEY")
    _checked(value, check_value, "VALUE")
    out = Output(state.json)
    with KvpPools(pool_dir_for(state, pool_dir), check_daemon=False) as pools:
        new = pools.set(pool, key, value)
    out.emit({**_record(pool, key.encode(), value.encode()), "created": new},
             f"{'added' if new else 'updated'} {key!r} in pool {pool}")


@kvp.command("delete")
@click.argument("key")
@_pool_option(1, "The pool to delete from.")
@_POOL_DIR
@json_option
@click.pass_obj
def kvp_delete(state: CliState, key: str, pool: int, pool_dir: Path | None) -> None:
    """Delete KEY (exit 1 if the pool does not have it)."""
    _checked(key, check_key, "KEY")
    out = Output(state.json)
    with KvpPools(pool_dir_for(state, pool_dir), create=False, check_daemon=False) as pools:
        if not pools.delete(pool, key):
            raise KvpKeyNotFound(key, [pool])
    out.emit({"pool": pool, "key": key, "deleted": True}, f"deleted {key!r} from pool {pool}")


def register(group: click.Group) -> None:
    """Add ``vmbus kvp ...`` to ``group`` and ``kvp`` to ``vmbus ic``."""
    ic.add_command(ic_kvp)
    group.add_command(kvp)

