"""The lifecycle table on its own: no transport, no threads (h11-style)."""

from __future__ import annotations

import itertools

import pytest

from pyvmbus.errors import InvalidState, UsageError
from pyvmbus.lifecycle import POLICY, TRANSITIONS, ChannelState, Event, Lifecycle

S, E = ChannelState, Event


def walk(lc: Lifecycle, *events: Event) -> list[ChannelState]:
    return [lc.fire(e) for e in events]


def test_happy_path_and_reenable() -> None:
    lc = Lifecycle("dev")
    assert lc.state is S.DISABLED and lc.reason is None
    lc.enable()
    assert walk(lc, E.OPENED, E.STARTED, E.POST_STARTED) == [S.OPENED, S.STARTED, S.RUNNING]
    assert lc.close("disabled") is True
    assert lc.state is S.CLOSING and lc.reason == "disabled"
    assert lc.fire(E.CLOSED) is S.DISABLED
    assert lc.reason == "disabled"  # kept after close, for diagnostics
    lc.enable()  # after closed, enable works again and the reason is cleared
    assert lc.state is S.OPENING and lc.reason is None


def test_open_failed_rolls_back_without_close() -> None:
    lc = Lifecycle("dev")
    lc.enable()
    assert lc.close("rescinded") is False  # nothing to close while opening
    assert lc.fire(E.OPEN_FAILED) is S.DISABLED


@pytest.mark.parametrize("at", [S.OPENED, S.STARTED, S.RUNNING])
def test_close_from_every_open_state_first_reason_wins(at: ChannelState) -> None:
    lc = Lifecycle("dev")
    lc.enable()
    for ev in (E.OPENED, E.STARTED, E.POST_STARTED):
        if lc.state is at:
            break
        lc.fire(ev)
    assert lc.state is at
    assert lc.close("rescinded")
    assert not lc.close("disabled")
    assert lc.reason == "rescinded"


def test_every_missing_transition_is_invalid_state() -> None:
    for state, event in itertools.product(S, E):
        lc = Lifecycle("abc")
        lc.state = state
        if (state, event) in TRANSITIONS:
            assert lc.can(event)
            continue
        assert not lc.can(event)
        with pytest.raises(InvalidState) as info:
            lc.fire(event)
        assert isinstance(info.value, UsageError)
        assert info.value.state == state.value and "abc" in str(info.value)
        assert lc.state is state  # unchanged


def test_enable_twice_says_what_to_do() -> None:
    lc = Lifecycle("g")
    lc.enable()
    with pytest.raises(InvalidState, match="disable"):
        lc.enable()


def test_policy_table() -> None:
    assert set(POLICY) == set(S)
    # sends from on_started on; waits only once dispatch runs (post-started on)
    assert [s for s in S if POLICY[s].may_send] == [S.OPENED, S.STARTED, S.RUNNING]
    assert [s for s in S if POLICY[s].may_wait] == [S.STARTED, S.RUNNING]
    # post-started: completions delivered, other packets held
    assert POLICY[S.STARTED].completions and not POLICY[S.STARTED].packets
    assert POLICY[S.RUNNING].packets
    for quiet in (S.DISABLED, S.OPENING, S.CLOSING):
        p = POLICY[quiet]
        assert not (p.may_send or p.may_wait or p.completions or p.packets)
    lc = Lifecycle()
    lc.enable()
    lc.fire(E.OPENED)
    assert lc.policy is POLICY[S.OPENED]


def test_every_state_reachable_and_returns_to_disabled() -> None:
    reach = {S.DISABLED}
    frontier = [S.DISABLED]
    while frontier:
        s = frontier.pop()
        for (a, _e), b in TRANSITIONS.items():
            if a is s and b not in reach:
                reach.add(b)
                frontier.append(b)
    assert reach == set(S)
    # from every state there is a path back to disabled
    for start in S:
        seen, todo = {start}, [start]
        while todo:
            s = todo.pop()
            for (a, _e), b in TRANSITIONS.items():
                if a is s and b not in seen:
                    seen.add(b)
                    todo.append(b)
        assert S.DISABLED in seen or start is S.DISABLED


def test_str_is_lower_name() -> None:
    assert str(S.RUNNING) == "running"
    assert repr(Lifecycle("x")).startswith("Lifecycle('x'")
