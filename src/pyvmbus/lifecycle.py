"""The channel lifecycle as one transition table, with no I/O (after h11's ``_state.py``).

The states and their order follow Microsoft's kernel-mode client library (KMCL_AND_IC.md
section 2); :class:`pyvmbus.channel.Channel` does the I/O and fires the events below. What
each state allows (sending, waiting for a completion, delivering packets) is a property of
the state, held in :data:`POLICY`, so the channel never re-derives it from flags.

Rules of the table::

    state      event          next       what happens in the channel
    ---------  -------------  ---------  -------------------------------------------------
    disabled   ENABLE         opening    open the uio node, map and check the rings,
                                         store mask=1 in every inbound ring header
    opening    OPENED         opened     on_opened returned (it runs in ``opening``)
    opening    OPEN_FAILED    disabled   mapping failed or on_opened raised: node closed,
                                         error re-raised, no on_closed (it never opened)
    opened     STARTED        started    on_started returned (it may send, never wait);
                                         then unmask + write 1 + start dispatch
    started    POST_STARTED   running    on_post_started returned (it may wait for
                                         completions; other packets are held meanwhile)
    opened     CLOSE          closing    disable(), rescind, corrupt ring, host crash,
    started    CLOSE          closing      or a start callback raised: outstanding
    running    CLOSE          closing      requests fail with ChannelClosed
    closing    CLOSED         disabled   resources released; then on_closed(reason)

Closing is first-reason-wins: a rescind seen while ``disable()`` is tearing down does not
change the reason. Anything not in the table is a caller error (:class:`InvalidState`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from .errors import InvalidState

__all__ = [
    "ChannelState",
    "Event",
    "Lifecycle",
    "POLICY",
    "StatePolicy",
    "TRANSITIONS",
]


class ChannelState(enum.Enum):
    """Where a channel is in its life (``channel.state``); ``str()`` gives the lower-case name."""

    DISABLED = "disabled"
    OPENING = "opening"
    OPENED = "opened"
    STARTED = "started"
    RUNNING = "running"
    CLOSING = "closing"

    def __str__(self) -> str:
        return self.value


class Event(enum.Enum):
    """What the channel reports to the state machine."""

    ENABLE = "enable"
    OPENED = "opened"
    OPEN_FAILED = "open_failed"
    STARTED = "started"
    POST_STARTED = "post_started"
    CLOSE = "close"
    CLOSED = "closed"


S, E = ChannelState, Event

TRANSITIONS: Final[dict[tuple[ChannelState, Event], ChannelState]] = {
    (S.DISABLED, E.ENABLE): S.OPENING,
    (S.OPENING, E.OPENED): S.OPENED,
    (S.OPENING, E.OPEN_FAILED): S.DISABLED,
    (S.OPENED, E.STARTED): S.STARTED,
    (S.STARTED, E.POST_STARTED): S.RUNNING,
    (S.OPENED, E.CLOSE): S.CLOSING,
    (S.STARTED, E.CLOSE): S.CLOSING,
    (S.RUNNING, E.CLOSE): S.CLOSING,
    (S.CLOSING, E.CLOSED): S.DISABLED,
}
"""(state, event) -> next state; the whole lifecycle."""


@dataclass(frozen=True)
class StatePolicy:
    """What a state allows. The dispatcher consults it for every packet batch."""

    may_send: bool
    """send() / complete() write to the ring (from on_started on, as KMCL allows)."""
    may_wait: bool
    """A thread may block for a completion (post-started on; on_started must not wait)."""
    completions: bool
    """Completions of our requests are handed to their waiters."""
    packets: bool
    """Other packets reach on_packet; when False while ``completions`` is True they are held."""


POLICY: Final[dict[ChannelState, StatePolicy]] = {
    S.DISABLED: StatePolicy(may_send=False, may_wait=False, completions=False, packets=False),
    S.OPENING: StatePolicy(may_send=False, may_wait=False, completions=False, packets=False),
    S.OPENED: StatePolicy(may_send=True, may_wait=False, completions=False, packets=False),
    S.STARTED: StatePolicy(may_send=True, may_wait=True, completions=True, packets=False),
    S.RUNNING: StatePolicy(may_send=True, may_wait=True, completions=True, packets=True),
    S.CLOSING: StatePolicy(may_send=False, may_wait=False, completions=False, packets=False),
}
"""Per-state permissions (see the module docstring)."""

_HINTS: Final[dict[Event, str]] = {
    E.ENABLE: "disable() it first, or wait for on_closed",
    E.OPENED: "internal ordering error",
    E.OPEN_FAILED: "internal ordering error",
    E.STARTED: "internal ordering error",
    E.POST_STARTED: "internal ordering error",
    E.CLOSE: "the channel is not open",
    E.CLOSED: "internal ordering error",
}


class Lifecycle:
    """The state of one channel, moved only through :data:`TRANSITIONS`.

    Not thread-safe on its own: the channel fires events under its state lock.
    """

    __slots__ = ("device", "policy", "reason", "state")

    def __init__(self, device: str = "") -> None:
        self.device = device
        self.state = S.DISABLED
        self.policy = POLICY[S.DISABLED]
        self.reason: str | None = None
        """Why the channel last closed (None until it has closed once)."""

    def fire(self, event: Event) -> ChannelState:
        """Apply ``event``; :class:`InvalidState` if the table has no such transition."""
        try:
            new = TRANSITIONS[(self.state, event)]
        except KeyError:
            raise InvalidState(self.device, self.state.value, event.value, _HINTS[event]) from None
        self.state = new
        self.policy = POLICY[new]
        return new

    def can(self, event: Event) -> bool:
        """Whether ``event`` is allowed now."""
        return (self.state, event) in TRANSITIONS

    def enable(self) -> None:
        """disabled -> opening, clearing the last close reason."""
        self.fire(E.ENABLE)
        self.reason = None

    def close(self, reason: str) -> bool:
        """Start closing with ``reason``; False if closing already started (first reason wins).

        From ``opening`` there is nothing to close yet: the caller fails the enable instead.
        """
        if not self.can(E.CLOSE):
            return False
        self.fire(E.CLOSE)
        self.reason = reason
        return True

    def __repr__(self) -> str:
        return f"Lifecycle({self.device!r}, state={self.state.value}, reason={self.reason!r})"
