"""The ``--json`` schema of every ``vmbus`` command: the keys of each object, with a note each.

One table read by the tests (every key of every object a command prints must be here, and
nothing else) and by docs/cli.md. Keys are only ever added, with a note in the changelog;
a key whose value is unknown is ``null``, never missing.
"""

from __future__ import annotations

from typing import Final

__all__ = ["EVENT_COMMON", "SCHEMAS"]

_DEVICE_ROW: Final = {
    "guid": "instance GUID (lower case, no braces)",
    "class": "class short name (network, scsi, heartbeat, ...; mock models such as echo; unknown)",
    "class_guid": "class GUID",
    "relid": "primary channel relid (sysfs id)",
    "driver": "bound driver, or null",
    "uio": "uio node name (uio0) when bound to uio_hv_generic, else null",
    "monitored": "true when the channel has a monitor id",
    "monitor_id": "monitor id, or null",
}

_CHANNEL: Final = {
    "relid": "channel relid",
    "subchannel_id": "0 for the primary, 1.. for subchannels",
    "cpu": "target CPU",
    "monitor_id": "monitor id, or null",
    "in_mask": "inbound (host->guest) ring interrupt mask",
    "out_mask": "outbound (guest->host) ring interrupt mask",
    "read_avail": "bytes waiting in the inbound ring",
    "write_avail": "bytes free in the outbound ring",
    "events": "signals sent to the host (kernel count)",
    "interrupts": "interrupts from the host (kernel count)",
    "intr_in_full": "kernel counter",
    "intr_out_empty": "kernel counter",
    "out_full_first": "kernel counter",
    "out_full_total": "kernel counter",
    "ring_file": "path of channels/<relid>/ring, or null before it appears",
    "ring_file_size": "its st_size (a fixed 4 MiB on kernels before 65995e97a1ca), or null",
}

_RING_SIDE: Final = {
    "read_index": "read index (byte offset into the data area)",
    "write_index": "write index",
    "interrupt_mask": "interrupt_mask word of the ring header",
    "bytes_used": "bytes written and not yet read",
    "bytes_free": "bytes free for the writer",
    "data_size": "data area size (ring size minus the header page)",
    "occupancy": "bytes_used / data_size (0..1)",
    "pending_send_size": "pending_send_sz (null from sysfs)",
    "feature_bits": "feature_bits (null from sysfs)",
}

_SIGNAL: Final = {
    "mechanism": "monitor-page or fd-write",
    "relid": "relid whose bit is set (monitor-page)",
    "monitor_id": "monitor id, or null",
    "int_page_word_offset": "(monitor-page only) byte offset of the word in the interrupt page",
    "int_page_bit_mask": "(monitor-page only) bit mask in that word",
    "monitor_pending_offset": "(monitor-page only) offset of trigger_group[id/32].pending",
    "monitor_bit_mask": "(monitor-page only) bit mask in that word",
    "reason": "why this mechanism",
    "notes": "kernel-generation notes (list of strings)",
    "subchannels": "per subchannel: relid, mechanism, reason",
}

EVENT_COMMON: Final = {"event": "event name", "t": "seconds since the command started"}

_FAULT: Final = {
    "device": "instance GUID", "class": "class short name",
    "kind": "rescind, reoffer, remove, corrupt, stall, resume, storm, crash, header or descriptor",
    "relid": "the new relid (reoffer), else null",
    "args": "the --arg KEY=VALUE given, as strings ({} when none)",
}

_IC_SUMMARY: Final = {
    **EVENT_COMMON, "device": "GUID", "service": "heartbeat, shutdown, timesync, fcopy or kvp",
    "requests": "IC messages received", "answered": "of them answered",
    "dropped": "not answered, as the kernel drops them (too short / too long)",
    "negotiations": "version negotiations", "unknown_types": "messages of another type (HV_E_FAIL)",
    "errors": "exceptions inside the service (a bug: please report)",
}

_RECORD: Final = {"record": "record (frame) number in the file, from 1", "relid": "channel relid",
                  "subchannel": "0 for the primary, else the subchannel index"}
_PACKET: Final = {"type": "packet type number", "type_name": "DATA_INBAND, COMP, ...",
                  "flags": "descriptor flags", "transaction_id": "transaction id",
                  "length": "payload bytes (padded to 8, as the ring holds them)",
                  "payload_hex": "first --preview bytes, hex", "offset8": "descriptor offset8",
                  "len8": "descriptor len8"}

SCHEMAS: Final[dict[str, dict[str, str]]] = {
    "error": {
        "error": "the one-line message (also the fix)",
        "type": "exception class name",
        "exit_code": "the exit code",
    },
    "list": {"root": "the root read", "devices": "list of list.device"},
    "list.device": _DEVICE_ROW,
    "show": {
        "guid": "instance GUID", "path": "sysfs directory", "class": "class short name",
        "class_guid": "class GUID", "class_description": "what the class is, or null",
        "relid": "primary relid",
        "state": "sysfs state (2 offered or closed, 3 opened by a driver; 0 offer, 1 opening)",
        "state_name": "state as a word", "monitored": "has a monitor id", "monitor_id": "or null",
        "driver": "bound driver or null", "driver_override": "or null",
        "numa_node": "or null", "vendor": "PCI vendor id (0x1414)",
        "device_type": "kernel dev_type index", "channel_vp_mapping": "[[relid, cpu], ...]",
        "net_interfaces": "interfaces the driver registered",
        "attributes": "every readable file of the device directory: name -> text or null",
        "channels": "list of show.channel", "uio": "show.uio or null",
        "ring": "{tx, rx: ring.side, note, engine: the ring engine of this process, c or python}",
        "signal": "show.signal",
        "bind_record": "what 'vmbus bind' saved for restore, or null",
        "guard_rails": "why binding would hurt this system (empty: safe)",
    },
    "show.channel": _CHANNEL,
    "show.uio": {"name": "uioN", "node": "device node path", "driver_name": "uio_hv_generic",
                 "version": "driver version", "event": "cumulative interrupt count",
                 "maps": "list of {index, name, addr, size, offset}"},
    "show.signal": _SIGNAL,
    "ring": {
        "device": "instance GUID", "class": "class short name",
        "source": "sysfs (kernel attributes) or map (ring headers through the uio node)",
        "state": "sysfs state", "channel_open": "state == 3",
        "driver": "bound driver", "uio": "uio node or null", "uio_events": "uio event count or null",
        "channels": "list of show.channel", "note": "where the numbers come from",
        "tx": "ring.side: guest->host ring", "rx": "ring.side: host->guest ring",
        "violations": "header words that break the ring rules (--map only; docs/ring.md), one "
                      "line each; empty when none",
    },
    "ring.side": _RING_SIDE,
    "bind": {"device": "instance GUID", "class": "class short name", "driver": "uio_hv_generic",
             "uio": "uio node name", "node": "device node path",
             "previous_driver": "driver it had (restore puts it back)",
             "already": "true when it was bound to uio_hv_generic already"},
    "unbind": {"device": "instance GUID", "class": "class short name",
               "previous_driver": "driver it was released from (null if none)"},
    "restore": {"device": "instance GUID", "class": "class short name",
                "driver": "driver bound now (null if none)"},
    "enable.bound": {**EVENT_COMMON, "device": "GUID", "uio": "uio node",
                     "previous_driver": "driver it had; restored on exit"},
    "enable.opened": {**EVENT_COMMON, "device": "GUID", "relid": "relid", "monitor_id": "or null"},
    "enable.started": {**EVENT_COMMON, "device": "GUID"},
    "enable.post_started": {**EVENT_COMMON, "device": "GUID"},
    "enable.sent": {**EVENT_COMMON, "device": "GUID", "length": "payload bytes",
                    "transaction_id": "its transaction id", "completion_requested": "bool"},
    "enable.reply": {**EVENT_COMMON, "device": "GUID", "request_length": "bytes sent",
                     "length": "reply payload bytes", "payload_hex": "first --preview bytes"},
    "enable.packet": {**EVENT_COMMON, "device": "GUID", "type": "packet type number",
                      "type_name": "DATA_INBAND, COMP, ...", "flags": "descriptor flags",
                      "transaction_id": "transaction id", "length": "payload bytes",
                      "payload_hex": "first --preview bytes, hex"},
    "enable.processing_complete": {**EVENT_COMMON, "device": "GUID", "count": "packets in the batch"},
    "enable.closed": {**EVENT_COMMON, "device": "GUID", "reason": "disabled, rescinded, ..."},
    "enable.restored": {**EVENT_COMMON, "device": "GUID", "driver": "driver bound again, or null"},
    "enable.note": {**EVENT_COMMON, "device": "GUID", "message": "text"},
    "enable.stopped": {**EVENT_COMMON, "device": "GUID",
                       "why": "count, timeout, SIGINT, SIGTERM, closed or error",
                       "packets": "packets received (on_packet and replies)",
                       "replies": "replies to --send"},
    "demo.demo": {**EVENT_COMMON, "root": "the mock's root", "kernel": "mock kernel generation",
                  "device": "the echo device's GUID"},
    "watch.watching": {**EVENT_COMMON, "root": "root watched",
                       "source": "udev (pyudev) or poll (sysfs snapshots)"},
    "watch.action": {**EVENT_COMMON, "subsystem": "vmbus or uio",
                     "name": "GUID (vmbus) or uioN (uio)", "device": "instance GUID or null",
                     "class": "class short name or null", "driver": "driver (bind/unbind) or null"},
    "mock.serving": {**EVENT_COMMON, "root": "pass it as --root / Vmbus(root=...)",
                     "kernel": "generation", "pid": "mock process id",
                     "devices": "list of list.device"},
    "mock.stopped": {**EVENT_COMMON, "why": "SIGINT, SIGTERM or timeout"},
    "mock.fault": {**EVENT_COMMON, **_FAULT},
    "mock fault": _FAULT,
    "mock.replay": {**EVENT_COMMON, "device": "GUID of the replayed device", "source": "the capture file",
                    "ok": "true when the guest did what the capture recorded, and nothing else",
                    "expected": "guest packets in the capture", "matched": "of them matched",
                    "played": "host packets sent",
                    "pending": "guest packets of the capture not seen (yet)",
                    "diffs": "list of strings: record number, expected, got",
                    "ring_sizes": "{subchannel: TX ring data size in the capture}"},
    # vmbus capture show FILE: one object per record
    **{f"capture.{name}": {**EVENT_COMMON, **_RECORD, **extra} for name, extra in {
        "opened": {"device": "instance GUID", "monitor_id": "or null", "class": "class short name or null",
                   "class_guid": "class GUID or null", "tx_ring_size": "TX ring data bytes",
                   "rx_ring_size": "RX ring data bytes"},
        "post_started": {}, "rescind": {},
        "closed": {"reason": "disabled, rescinded, ..."},
        "packet": {**_PACKET},
        "sent": {**_PACKET, "completion_requested": "descriptor flags bit 0"},
        "signal": {"count": "signals sent on this channel so far"},
        "interrupt": {"count": "the kernel's uio event count"},
        "malformed": {"error": "why the record cannot be decoded"},
    }.items()},
    # vmbus ic heartbeat|shutdown|timesync|fcopy (and fcopy-daemon --json): the runner's events
    "ic.bound": {**EVENT_COMMON, "device": "GUID", "uio": "uio node",
                 "previous_driver": "driver it had (hv_utils, or null); restored on exit"},
    "ic.enabled": {**EVENT_COMMON, "device": "GUID", "relid": "relid",
                   "attempt": "1, then 2.. after each rescind and re-offer"},
    "ic.negotiated": {**EVENT_COMMON, "device": "GUID",
                      "service": "heartbeat, shutdown, timesync, fcopy or kvp",
                      "framework": "framework version chosen (\"3.0\")",
                      "version": "service version chosen (\"3.2\")"},
    "ic.negotiation_failed": {**EVENT_COMMON, "device": "GUID", "service": "service name",
                              "offered": "why (no version in common)"},
    "ic.closed": {**EVENT_COMMON, "device": "GUID", "reason": "rescinded, host crashed ..., corrupt ..."},
    "ic.waiting": {**EVENT_COMMON, "device": "GUID", "what": "what it waits for (the re-offer)",
                   "timeout": "--reoffer-timeout seconds, or null (until stopped)"},
    "ic.action_failed": {**EVENT_COMMON, "device": "GUID", "error": "the exception of a callback / action"},
    "ic.restored": {**EVENT_COMMON, "device": "GUID", "driver": "driver bound again, or null"},
    "ic.note": {**EVENT_COMMON, "device": "GUID", "message": "text"},
    "ic.stopped": {**EVENT_COMMON, "device": "GUID",
                   "why": "SIGINT, SIGTERM, until (--count), timeout, error, output closed",
                   "packets": "in-band messages handed to the service", "answered": "of them answered"},
    # ... and each service's own
    "ic.shutdown_request": {**EVENT_COMMON, "device": "GUID", "action": "poweroff, reboot or hibernate",
                            "flags": "shutdown_msg_data.flags", "force": "flags & 1",
                            "reason_code": "reason_code", "timeout_seconds": "timeout_seconds",
                            "message": "display_message", "command": "what --allow-shutdown runs",
                            "performed": "true when it ran the command",
                            "outcome": "what was done, in words"},
    "ic.sample": {**EVENT_COMMON, "device": "GUID", "offset_ns": "host - guest clock, ns",
                  "host_ns": "host time, Unix ns", "host_time": "host time, ISO 8601 UTC",
                  "sync": "true for a SYNC (a hard request), false for a SAMPLE",
                  "format": "\"<=3.0\" or \"4.0\" (reference-time format)", "flags": "ictimesync flags"},
    "ic.clock_set": {**EVENT_COMMON, "device": "GUID", "step_ns": "how far the clock moved, ns"},
    "ic.clock_not_set": {**EVENT_COMMON, "device": "GUID", "why": "mock / --root bus, or permission denied"},
    "ic.fcopy": {**EVENT_COMMON, "device": "GUID",
                 "kind": "started, completed, cancelled, failed or refused",
                 "path": "destination path, or null before it is known",
                 "size": "file_size from START, or bytes written", "status": "status sent (HV_S_OK, ...)",
                 "reason": "why it failed / was refused, or \"\""},
    "ic.kvp": {**EVENT_COMMON, "device": "GUID",
               "kind": "set, deleted, get, missing, enumerated, ip_get, ip_set or refused",
               "op": "the host's operation (SET, GET, DELETE, ENUMERATE, GET_IP_INFO, SET_IP_INFO)",
               "pool": "pool 0..4, or null (IP requests, unreadable ones)",
               "key": "the key (IP requests: the adapter id), or \"\"",
               "value": "the value set / read (IP requests: a summary), or \"\"",
               "status": "status sent (HV_S_OK, HV_S_CONT, HV_INVALIDARG ...)",
               "count": "enumerated: records the host read in that pass",
               "reason": "why it was refused / failed, or \"\""},
    # the last line of each 'vmbus ic' command: the service's counters
    "ic.heartbeat.summary": {**_IC_SUMMARY, "beats": "heartbeats answered",
                             "last_seq": "last seq_num received, or null"},
    "ic.shutdown.summary": {**_IC_SUMMARY, "accepted": "requests answered HV_S_OK"},
    "ic.timesync.summary": {**_IC_SUMMARY, "samples": "time messages handled",
                            "last_offset_ns": "offset of the last one, or null"},
    "ic.fcopy.summary": {**_IC_SUMMARY, "files_completed": "files renamed into place",
                         "bytes_written": "bytes of those files"},
    "ic.kvp.summary": {**_IC_SUMMARY, "sets": "SET requests (refused ones included)", "gets": "GET requests",
                       "deletes": "DELETE requests", "enumerates": "ENUMERATE requests (one per index)",
                       "ip_requests": "GET_IP_INFO and SET_IP_INFO requests",
                       "refused": "requests refused as malformed", "pool_dir": "where the pools are"},
    # vmbus kvp list|get|set|delete: the pool files
    "kvp.record": {"pool": "pool number 0..4", "key": "the key (UTF-8; bad bytes as U+FFFD)",
                   "value": "its value"},
    "kvp.set": {"pool": "pool number", "key": "the key", "value": "the value written",
                "created": "true when the key was new (appended), false when replaced"},
    "kvp.delete": {"pool": "pool number", "key": "the key", "deleted": "true"},
}
"""Object name -> {key: note}. ``enable.*`` events also make up ``demo``'s stream;
``watch.action`` covers the add, remove, bind, unbind and change events; ``ic.*`` are the
events of ``vmbus ic ...`` (``ic.<service>.summary`` its last line); ``kvp.record`` is a
line of ``vmbus kvp list`` and ``get``; ``capture.*`` the records ``vmbus capture show``
prints."""
