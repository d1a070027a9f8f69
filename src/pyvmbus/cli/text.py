"""Text renderings of ``vmbus list``, ``show``, ``ring`` and the one-shot commands (for people).

Each function takes exactly the data the ``--json`` form prints, so the two never disagree.
"""

from __future__ import annotations

from typing import Any

from .output import bar, fmt, table

__all__ = [
    "render_bind",
    "render_list",
    "render_restore",
    "render_ring",
    "render_show",
    "render_unbind",
]


def render_list(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no VMBus devices"
    return table(
        ("INSTANCE", "CLASS", "RELID", "DRIVER", "UIO", "MONITORED"),
        ([r["guid"], r["class"], r["relid"], r["driver"], r["uio"],
          "no" if r["monitor_id"] is None else f"yes ({r['monitor_id']})"] for r in rows),
        right=(2,),
    )


def _percent(fraction: float) -> str:
    if 0 < fraction < 0.001:
        return " <0.1%"
    return f"{fraction * 100:5.1f}%"


def _ring_rows(data: dict[str, Any]) -> str:
    rows = []
    for key, label in (("tx", "tx guest->host"), ("rx", "rx host->guest")):
        side = data.get(key) or {}
        used, size, occ = side.get("bytes_used"), side.get("data_size"), side.get("occupancy")
        fill = "-" if occ is None else f"{bar(occ)} {_percent(occ)}"
        usage = "-" if used is None or size is None else f"{used}/{size}"
        rows.append([label, side.get("read_index"), side.get("write_index"), side.get("interrupt_mask"),
                     side.get("pending_send_size"),
                     None if side.get("feature_bits") is None else f"{side['feature_bits']:#x}",
                     usage, side.get("bytes_free"), fill])
    return table(("RING", "READ", "WRITE", "MASK", "PENDING_SEND", "FEATURES", "USED/SIZE", "FREE",
                  "OCCUPANCY"), rows, right=(1, 2, 3, 4, 7))


def _channel_rows(chans: list[dict[str, Any]]) -> str:
    return table(
        ("RELID", "SUB", "CPU", "MONITOR", "IN_MASK", "OUT_MASK", "READ_AVAIL", "WRITE_AVAIL", "EVENTS",
         "INTERRUPTS", "RING FILE"),
        ([c["relid"], c["subchannel_id"], c["cpu"], c["monitor_id"], c["in_mask"], c["out_mask"],
          c["read_avail"], c["write_avail"], c["events"], c["interrupts"],
          "-" if c["ring_file"] is None else f"yes ({c['ring_file_size']} bytes)"] for c in chans),
        right=(0, 1, 2, 3, 4, 5, 6, 7, 8, 9),
    )


def render_ring(data: dict[str, Any]) -> str:
    head = (f"{data['device']} ({data['class']}): channel {'open' if data['channel_open'] else 'not open'}"
            f", driver {fmt(data['driver'])}, uio {fmt(data['uio'])}, uio events "
            f"{fmt(data['uio_events'])}; source: {data['source']}")
    lines = [head, _ring_rows(data)]
    if data["channels"]:
        lines += ["", _channel_rows(data["channels"])]
        names = ("intr_in_full", "intr_out_empty", "out_full_first", "out_full_total")
        lines += [f"relid {c['relid']}: " + ", ".join(f"{k} {fmt(c[k])}" for k in names)
                  for c in data["channels"]]
    if data.get("note"):
        lines.append(f"note: {data['note']}")
    lines += [f"CORRUPT: {v}" for v in data.get("violations", [])]
    return "\n".join(lines)


def render_show(d: dict[str, Any]) -> str:
    desc = f": {d['class_description']}" if d["class_description"] else ""
    mon = "no (no monitor id)" if d["monitor_id"] is None else f"yes, monitor_id {d['monitor_id']}"
    lines = [
        f"device {d['guid']}  ({d['class']}{desc})",
        f"  class GUID       {d['class_guid']}",
        f"  sysfs            {d['path']}",
        f"  relid            {d['relid']}",
        f"  state            {d['state']} ({d['state_name']})",
        f"  monitored        {mon}",
        f"  driver           {fmt(d['driver'])}" + (f" (driver_override {d['driver_override']})"
                                                     if d["driver_override"] else ""),
        f"  numa node        {fmt(d['numa_node'])}",
        f"  vendor / device  {fmt(d['vendor'] if d['vendor'] is None else hex(d['vendor']))} / "
        f"{fmt(d['device_type'])}",
        f"  channel -> cpu   {', '.join(f'{r}:{c}' for r, c in d['channel_vp_mapping']) or '-'}",
    ]
    if d["net_interfaces"]:
        lines.append(f"  interfaces       {', '.join(d['net_interfaces'])}")
    lines += ["", "attributes (sysfs):"]
    width = max((len(k) for k in d["attributes"]), default=0)
    for name, value in d["attributes"].items():
        lines.append(f"  {name.ljust(width)}  {fmt(value).replace(chr(10), ' | ')}")
    lines += ["", "channels:", _channel_rows(d["channels"]) if d["channels"] else "  none"]
    lines += ["", "uio:"]
    uio = d["uio"]
    if uio is None:
        lines.append("  not bound to uio_hv_generic (no uio node)")
    else:
        lines.append(f"  {uio['name']} ({uio['driver_name']} {uio['version']}), node {uio['node']}, "
                     f"events {uio['event']}")
        lines.append(table(("MAP", "NAME", "SIZE", "ADDR", "OFFSET"),
                           ([f"map{m['index']}", m["name"], f"{m['size']:#x}", f"{m['addr']:#x}",
                             f"{m['offset']:#x}"] for m in uio["maps"])))
    lines += ["", "ring state (primary channel):", _ring_rows(d["ring"])]
    if d["ring"].get("note"):
        lines.append(f"  note: {d['ring']['note']}")
    engine = d["ring"].get("engine")
    if engine:
        how = "compiled, pyvmbus._ring" if engine == "c" else "pure Python, ring.py"
        lines.append(f"  engine: {engine} ({how}; PYVMBUS_RING=c|python chooses)")
    sig = d["signal"]
    lines += ["", f"signalling the host: {sig['mechanism']}", f"  why: {sig['reason']}"]
    lines += [f"  note: {n}" for n in sig["notes"]]
    lines += [f"  subchannel relid {s['relid']}: {s['mechanism']}: {s['reason']}" for s in sig["subchannels"]]
    rec = d["bind_record"]
    lines.append("")
    if rec is not None:
        lines.append(f"bound by pyvmbus ({rec['method']}): 'vmbus restore {d['guid']}' gives it back to "
                     f"{rec['previous_driver'] or 'no driver'}")
    if d["guard_rails"]:
        lines.append("guard rails (binding needs --force): " + "; ".join(d["guard_rails"]))
    elif d["driver"] != "uio_hv_generic":
        lines.append("guard rails: none (binding it takes nothing the system depends on)")
    return "\n".join(lines).rstrip()


def render_bind(d: dict[str, Any]) -> str:
    if d["already"]:
        return f"{d['device']} ({d['class']}) is already bound to uio_hv_generic: {d['node']}"
    was = d["previous_driver"] or "no driver"
    return (f"bound {d['device']} ({d['class']}) to uio_hv_generic: {d['node']} (was: {was}); "
            f"'vmbus restore {d['device']}' gives it back")


def render_unbind(d: dict[str, Any]) -> str:
    if d["previous_driver"] is None:
        return f"{d['device']} ({d['class']}) was not bound to any driver"
    return (f"released {d['device']} ({d['class']}) from {d['previous_driver']}; it has no driver now "
            f"('vmbus restore {d['device']}' binds it again)")


def render_restore(d: dict[str, Any]) -> str:
    now = d["driver"] or "no driver (none claimed it)"
    return f"restored {d['device']} ({d['class']}): now bound to {now}"
