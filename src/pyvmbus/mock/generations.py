"""How each uio_hv_generic generation behaves (SPEC.md sections 1-3 and 8).

The mock kernel consults one :class:`KernelGeneration` for every decision where real
kernels differ: who masks the inbound interrupt and when, what a 4-byte write does, how
big the rings are, what sysfs shows, and what a rescind leaves behind. A client that is
only right on one generation must fail against the others: that is what the mock is for.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..classes import DEFAULT_RING_SIZE, DeviceClass

__all__ = ["BEHAVIOURS", "DEFAULT_GENERATION", "GENERATIONS", "SOURCES", "Behaviour", "KernelGeneration",
           "generation", "kernels_markdown"]

PAGE_SIZE = 4096
HV_RING_HEADER = PAGE_SIZE  # sizeof(struct hv_ring_buffer) == PAGE_SIZE


@dataclass(frozen=True)
class KernelGeneration:
    """One row of SPEC section 8, plus the sysfs and sizing facts of sections 1 and 3."""

    name: str
    description: str
    refuses_unmonitored: bool
    """Probe fails with -ENOTSUPP for a channel without a monitor id (<= 6.9, 6.6 LTS)."""
    masks_on_interrupt: bool
    """hv_uio_channel_cb stores interrupt_mask = 1 in the interrupting channel's ring."""
    masks_on_open: bool
    """open() / subchannel creation leave interrupt_mask = 1 (else the header is untouched: 0)."""
    write_covers_subchannels: bool
    """A 4-byte write sets mask = !value on the primary and every subchannel (else primary only)."""
    write_touches_mask: bool
    """False for OpenHCL's no_mask=1: a write never changes any mask."""
    signal_on_unmask: bool
    """A write of a nonzero value makes the kernel signal the host (vmbus_setevent)."""
    signal_subchannels: bool
    """signal_on_unmask also applies to non-monitored subchannels (d062463 and later)."""
    per_class_ring_size: bool
    """6.10+: ring size from the class's pref_ring_size (else always 2 MiB)."""
    page_aligned_ring: bool
    """0315fef2: ring_size = VMBUS_RING_SIZE(pref) (adds the header page below 8 headers)."""
    unregister_on_rescind: bool
    """hv_uio_rescind unregisters the device (6fd28941447b, Sep 2024, in every stable line
    modelled): the node and the sysfs directory go away. OpenHCL's tree lacks it: the device
    stays registered and only reads fail with EIO."""
    hide_monitor_attrs: bool
    """monitor_id and *_monitor_* files are hidden for non-monitored channels.

    SPEC.md says old kernels always show them; the kernel source disagrees: 46fc15487d02
    ("Expose monitor data only when monitor pages are used", v5.2, in 4.19.y) hides them at
    device and channel level, so every generation here hides them. The flag stays so a
    pre-5.2 behaviour can be modelled.
    """
    fixed_ring_file_size: bool
    """Before 65995e97a1ca the ring bin file claims 2 * 2 MiB whatever the ring is (an mmap of
    more than the real ring fails with EINVAL); after it, st_size is the real pair."""
    subchannel_interrupt_crash: bool = False
    """hv_uio_channel_cb has no primary lookup (every tree before d062463 and before the Dec
    2025 LTS backport, OpenHCL): it reads the subchannel's NULL device_obj, so any host
    interrupt on a subchannel oopses the kernel."""
    primary_ring_size: int | None = None
    """A module parameter fixes the primary's ring (OpenHCL: uio_hv_generic.ring_size=0x11000)."""
    gpadl_buffers: str = "nic"
    """Which devices get the recv/send GPADL maps 3 and 4: "all" (before 6.10 and on the 5.4-6.6
    LTS lines), "nic" (6.10+: HV_NIC only) or "none" (OpenHCL: send/recv_buf_size=0)."""
    crash_function: str = "hv_uio_channel_cb"
    """The kernel function whose NULL dereference the mock's oops names."""

    def ring_size(self, cls: DeviceClass, subchannel: bool = False) -> int:
        """Bytes per direction (header page included) that probe would allocate."""
        if subchannel:
            return DEFAULT_RING_SIZE
        if self.primary_ring_size is not None:
            return self.primary_ring_size
        if not self.per_class_ring_size:
            return DEFAULT_RING_SIZE
        size = cls.ring_size
        if self.page_aligned_ring:
            size = vmbus_ring_size(size)
        return size


def vmbus_ring_size(payload: int) -> int:
    """VMBUS_RING_SIZE(p) = PAGE_ALIGN(p + (p >= 8 * header ? 0 : header)) (include/linux/hyperv.h)."""
    size = payload + (0 if payload >= 8 * HV_RING_HEADER else HV_RING_HEADER)
    return (size + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE


GENERATIONS: dict[str, KernelGeneration] = {
    g.name: g
    for g in (
        KernelGeneration(
            "5.15", "<= 6.9 and 5.4-6.6 LTS before b15b7: kernel masks on interrupt and open; "
            "primary-only writes; monitored only; a subchannel interrupt oopses",
            refuses_unmonitored=True, masks_on_interrupt=True, masks_on_open=True,
            write_covers_subchannels=False, write_touches_mask=True, signal_on_unmask=False,
            signal_subchannels=False, per_class_ring_size=False, page_aligned_ring=False,
            unregister_on_rescind=True, hide_monitor_attrs=True, fixed_ring_file_size=True,
            subchannel_interrupt_crash=True, gpadl_buffers="all",
        ),
        KernelGeneration(
            "6.10", "6.10 up to d062463: a write of 1 also signals a non-monitored primary; a "
            "subchannel interrupt oopses",
            refuses_unmonitored=False, masks_on_interrupt=True, masks_on_open=True,
            write_covers_subchannels=False, write_touches_mask=True, signal_on_unmask=True,
            signal_subchannels=False, per_class_ring_size=True, page_aligned_ring=False,
            unregister_on_rescind=True, hide_monitor_attrs=True, fixed_ring_file_size=True,
            subchannel_interrupt_crash=True,
        ),
        KernelGeneration(
            "6.15", "d062463 (~6.15-6.17): writes cover every channel; each non-monitored one is signalled",
            refuses_unmonitored=False, masks_on_interrupt=True, masks_on_open=True,
            write_covers_subchannels=True, write_touches_mask=True, signal_on_unmask=True,
            signal_subchannels=True, per_class_ring_size=True, page_aligned_ring=True,
            unregister_on_rescind=True, hide_monitor_attrs=True, fixed_ring_file_size=False,
        ),
        KernelGeneration(
            "6.18", "newest (b15b7): the kernel never touches the mask; userspace owns it",
            refuses_unmonitored=False, masks_on_interrupt=False, masks_on_open=False,
            write_covers_subchannels=True, write_touches_mask=True, signal_on_unmask=True,
            signal_subchannels=True, per_class_ring_size=True, page_aligned_ring=True,
            unregister_on_rescind=True, hide_monitor_attrs=True, fixed_ring_file_size=False,
        ),
        KernelGeneration(
            "6.12-debian", "b15b7 without d062463 (e.g. Debian 6.12.57): no kernel masking, primary-only "
            "writes; a subchannel interrupt oopses the kernel",
            refuses_unmonitored=False, masks_on_interrupt=False, masks_on_open=False,
            write_covers_subchannels=False, write_touches_mask=True, signal_on_unmask=True,
            signal_subchannels=False, per_class_ring_size=True, page_aligned_ring=True,
            unregister_on_rescind=True, hide_monitor_attrs=True, fixed_ring_file_size=False,
            subchannel_interrupt_crash=True,
        ),
        KernelGeneration(
            "6.6-lts", "5.4-6.6 LTS after the Dec 2025 backport: no kernel masking, no host signal",
            refuses_unmonitored=True, masks_on_interrupt=False, masks_on_open=False,
            write_covers_subchannels=True, write_touches_mask=True, signal_on_unmask=False,
            signal_subchannels=False, per_class_ring_size=False, page_aligned_ring=False,
            unregister_on_rescind=True, hide_monitor_attrs=True, fixed_ring_file_size=True,
            gpadl_buffers="all",
        ),
        KernelGeneration(
            "openhcl", "OpenHCL kernel, uio_hv_generic.no_mask=1 ring_size=0x11000 send_buf_size=0 "
            "recv_buf_size=0: writes never mask; 1 signals a non-monitored primary; a subchannel "
            "interrupt oopses; rescind keeps the device",
            refuses_unmonitored=False, masks_on_interrupt=False, masks_on_open=False,
            write_covers_subchannels=False, write_touches_mask=False, signal_on_unmask=True,
            signal_subchannels=False, per_class_ring_size=False, page_aligned_ring=False,
            unregister_on_rescind=False, hide_monitor_attrs=True, fixed_ring_file_size=True,
            subchannel_interrupt_crash=True, primary_ring_size=0x11000, gpadl_buffers="none",
        ),
    )
}

DEFAULT_GENERATION = "6.18"


def generation(name: str) -> KernelGeneration:
    """The generation called ``name``; ValueError listing the known names otherwise."""
    try:
        return GENERATIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown kernel generation {name!r}; known: {', '.join(GENERATIONS)}"
        ) from None


# -- the table docs/kernels.md is generated from ------------------------------------------------

UHG = "uio_hv_generic.c"
SOURCES: dict[str, str] = {
    "5.15": "torvalds/linux uio_hv_generic.c @cbecf716 (<= 6.9) + fb1adbd7e50f/6fd28941447b "
            "(Sep 2024 stable)",
    "6.10": "547fa4ffd799, e566ed5b6417 (6.10) + fb1adbd7e50f/6fd28941447b",
    "6.15": "d062463edf17 (Mar 2025)",
    "6.18": "b15b7d2a1b09 (Aug 2025) on top of d062463edf17, 0315fef2aff9, 65995e97a1ca",
    "6.12-debian": "37bd91f22794 (6.12.y backport of b15b7) before the Nov 2025 6.12 backport of d062463",
    "6.6-lts": "[PATCH 5.4-6.6 v2] 'Enable user space to manage interrupt_mask for subchannels' "
               "(Nov/Dec 2025, Closes Debian #1120602)",
    "openhcl": "microsoft/OHCL-Linux-Kernel uio_hv_generic.c @05b48eb85d34 + openvmm openhcl_boot "
               "build_kernel_command_line + the 'slower vmbus device channels' module parameters",
}
"""Where each column's facts come from (docs/kernels.md prints it under the table)."""


@dataclass(frozen=True)
class Behaviour:
    """One row of docs/kernels.md: a value per generation, its kernel source, the test."""

    title: str
    value: Callable[[KernelGeneration], str]
    source: Callable[[KernelGeneration], str]
    test: str
    """``tests/<file>.py::<test function>`` that holds the mock to this row."""


def _mib(n: int) -> str:
    return f"{n // (1 << 20)} MiB" if n % (1 << 20) == 0 else f"{n:#x}"


def _ring(g: KernelGeneration) -> str:
    from ..classes import class_by_name

    fc = g.ring_size(class_by_name("fcopy"))
    net = g.ring_size(class_by_name("network"))
    if g.primary_ring_size is not None:
        sub = g.ring_size(class_by_name("network"), True)
        return f"{_mib(net)} (ring_size= parameter), subchannels {_mib(sub)}"
    return f"net {_mib(net)}, fcopy {_mib(fc)}; subchannels 2 MiB"


BEHAVIOURS: tuple[Behaviour, ...] = (
    Behaviour(
        "maps", lambda g: {"all": "rings, int, monitor + recv/send for every device",
                           "nic": "rings, int, monitor + recv/send for HV_NIC only",
                           "none": "rings, int, monitor; no recv/send (send/recv_buf_size=0)",
                           }[g.gpadl_buffers],
        lambda g: "hv_uio_probe, " + ("OHCL 05b48eb85d34 + boot line" if g.name == "openhcl"
                                      else "torvalds " + UHG),
        "tests/test_tree.py::test_uio_maps_per_generation"),
    Behaviour(
        "ring sizes (per direction)", _ring,
        lambda g: ("hv_uio_probe (HV_RING_SIZE 512 pages)"
                   if not g.per_class_ring_size and g.primary_ring_size is None
                   else "hv_uio_probe, ring_size module parameter" if g.primary_ring_size is not None
                   else "hv_uio_probe: hv_dev_ring_size (e566ed5b6417)"
                   + (" + VMBUS_RING_SIZE (0315fef2aff9)" if g.page_aligned_ring else ""))
        + "; hv_uio_new_channel (SZ_2M)",
        "tests/test_uio.py::test_map_sizes_per_class_and_generation"),
    Behaviour(
        "ring file", lambda g: ("st_size fixed 4 MiB" if g.fixed_ring_file_size else "st_size = real pair")
        + "; mmap ENODEV unless opened",
        lambda g: "hv_uio_ring_mmap; " + ("static ring_buffer_bin_attr" if g.fixed_ring_file_size
                                          else "65995e97a1ca (dynamic size)"),
        "tests/test_uio.py::test_ring_file_maps_the_same_memory_as_map0"),
    Behaviour(
        "mask on open", lambda g: "1 (primary and subchannels)" if g.masks_on_open else "untouched (0)",
        lambda g: "hv_uio_open, hv_uio_new_channel" + ("" if g.masks_on_open else
                                                       " (b15b7d2a1b09 removed it)" if g.write_touches_mask
                                                       else " (no_mask=1)"),
        "tests/test_mock_kernel.py::test_mask_after_open"),
    Behaviour(
        "mask on interrupt", lambda g: "1" if g.masks_on_interrupt else "untouched",
        lambda g: "hv_uio_channel_cb" + ("" if g.masks_on_interrupt else " (b15b7d2a1b09 / no_mask)"),
        "tests/test_mock_kernel.py::test_mask_on_interrupt"),
    Behaviour(
        "mask on write", lambda g: ("none" if not g.write_touches_mask else
                                    "primary and subchannels: !v" if g.write_covers_subchannels
                                    else "primary only: !v"),
        lambda g: "hv_uio_irqcontrol" + (" + set_event over sc_list (d062463edf17)"
                                         if g.write_covers_subchannels else ""),
        "tests/test_mock_kernel.py::test_write_masks_per_generation"),
    Behaviour(
        "host signal on write of 1", lambda g: ("none" if not g.signal_on_unmask else
                                                "every non-monitored channel" if g.signal_subchannels
                                                else "non-monitored primary only"),
        lambda g: "hv_uio_irqcontrol: " + ("vmbus_set_event per channel (d062463edf17)"
                                           if g.signal_subchannels
                                           else "vmbus_setevent (547fa4ffd799)" if g.signal_on_unmask
                                           else "no setevent"),
        "tests/test_mock_kernel.py::test_write_of_1_signals_a_non_monitored_host"),
    Behaviour(
        "subchannel interrupt", lambda g: "**oops** (NULL device_obj)" if g.subchannel_interrupt_crash
        else "safe (primary lookup)",
        lambda g: "hv_uio_channel_cb: " + ("hv_get_drvdata(chan->device_obj)" if g.subchannel_interrupt_crash
                                           else "chan->primary_channel->device_obj (d062463edf17)"),
        "tests/test_mock_kernel.py::test_subchannel_interrupt_oopses_kernels_without_the_primary_lookup"),
    Behaviour(
        "probe refusal", lambda g: "non-monitored: -ENOTSUPP" if g.refuses_unmonitored else "none",
        lambda g: "hv_uio_probe: !monitor_allocated" if g.refuses_unmonitored
        else "hv_uio_probe (check removed by 547fa4ffd799 / OHCL)",
        "tests/test_mock_kernel.py::test_old_kernels_refuse_unmonitored_channels"),
    Behaviour(
        "rescind", lambda g: "unregister: node + sysfs dir go, read EIO" if g.unregister_on_rescind
        else "stays registered, read EIO",
        lambda g: "hv_uio_rescind: vmbus_device_unregister (6fd28941447b)" if g.unregister_on_rescind
        else "hv_uio_rescind without 6fd28941447b (OHCL 05b48eb85d34)",
        "tests/test_mock_kernel.py::test_rescind_unregisters_on_every_generation_with_the_2024_fix"),
    Behaviour(
        "sysfs state", lambda g: "2 offered, 3 opened, 2 after close",
        lambda g: "vmbus_process_offer (CHANNEL_OPEN_STATE before vmbus_device_register), __vmbus_open",
        "tests/test_mock_kernel.py::test_state_is_2_when_offered_and_3_when_opened"),
)


def kernels_markdown() -> str:
    """The behaviour x generation table of docs/kernels.md (each cell: value, source)."""
    names = list(GENERATIONS)
    lines = ["| behaviour | " + " | ".join(f"`{n}`" for n in names) + " | test |",
             "|---|" + "---|" * len(names) + "---|"]
    for b in BEHAVIOURS:
        cells = [f"{b.value(GENERATIONS[n])}<br>*{b.source(GENERATIONS[n])}*" for n in names]
        lines.append(f"| {b.title} | " + " | ".join(cells) + f" | `{b.test}` |")
    lines.append("")
    lines.append("Columns:")
    lines.append("")
    for n in names:
        lines.append(f"- `{n}`: {GENERATIONS[n].description}. Source: {SOURCES[n]}.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # pragma: no cover - used by scripts/kernels_md.py
    print(kernels_markdown(), end="")
