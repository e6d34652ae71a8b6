"""The emit role machine (relayd/emit/role.py) on a fake clock: who emits a feed's groups."""

from __future__ import annotations

from ipaddress import IPv4Address

from relayd.emit.beacon import BeaconState
from relayd.emit.role import (
    CLAIM,
    GRACE,
    LEASE,
    SPLIT_TIMEOUT,
    ClaimOutcome,
    Role,
    RoleEvent,
    RoleMachine,
    StepDown,
)

ME = IPv4Address("10.0.0.5")
LOWER = IPv4Address("10.0.0.2")
HIGHER = IPv4Address("10.0.0.9")
TICK = GRACE / 10  # how often the observer decides


def current(machine: RoleMachine) -> Role:
    """The role now (a call, so that mypy does not keep an earlier narrowing)."""
    return machine.role


def run(machine: RoleMachine, start: float, end: float, other: IPv4Address | None = None) -> float:
    """The observer's loop from ``start`` to ``end``: drain (``other`` emitting), decide."""
    now = start
    while now < end:
        if other is not None:
            machine.saw(other, 100, now)
        machine.decide(now)
        now += TICK
    return now


def test_alone_ready_then_active_and_the_lease_follows_the_observer() -> None:
    role = RoleMachine(ME)
    assert role.decide(0.0) == []
    assert current(role) is Role.READY
    assert role.admits()
    assert role.may_emit(0.0)
    assert role.streaming(True, 0.1) == [RoleEvent.BECAME_ACTIVE]
    assert current(role) is Role.ACTIVE
    assert role.active_since == 0.1
    assert role.may_emit(LEASE - 0.01)
    assert not role.may_emit(LEASE + 0.01)  # no decision since: stale
    role.decide(1.0)
    assert role.may_emit(1.0 + LEASE - 0.01)
    role.streaming(True, 5.0)  # Trio's calls never renew the lease
    assert not role.may_emit(5.0)


def test_its_own_datagrams_are_not_another_relay() -> None:
    role = RoleMachine(ME)
    role.saw(ME, 1000, 0.0)
    role.decide(0.0)
    assert current(role) is Role.READY
    assert not role.others


def test_standby_while_another_relay_emits_then_ready_after_grace() -> None:
    role = RoleMachine(ME)
    now = run(role, 0.0, 1.0, other=LOWER)
    assert current(role) is Role.STANDBY
    assert not role.admits()
    assert not role.may_emit(now)
    reason = role.reason(now)
    assert reason is not None
    assert "10.0.0.2" in reason
    assert role.others[LOWER].first_seen == 0.0
    # the other stops: standby for GRACE after its last datagram, then ready
    last = now - TICK
    now = run(role, now, last + GRACE - 0.01)
    assert current(role) is Role.STANDBY
    events = role.decide(last + GRACE + 0.01)
    assert events == [RoleEvent.BECAME_READY]
    assert role.admits()
    assert role.may_emit(last + GRACE + 0.01)
    assert role.split_brains == 0


def test_a_standby_that_holds_a_stream_becomes_active_and_that_is_a_split_brain() -> None:
    """A stream admitted just before the other relay was first seen: both emit."""
    role = RoleMachine(ME)
    role.decide(0.0)
    role.streaming(True, 0.05)
    role.saw(LOWER, 5, 0.1)
    events = role.decide(0.1)
    assert RoleEvent.SPLIT_BRAIN in events
    assert role.split_brain
    assert role.split_brains == 1
    assert current(role) is Role.ACTIVE  # neither saw the other first: wait for the tie-break
    run(role, 0.2, 0.1 + SPLIT_TIMEOUT - TICK, other=LOWER)
    assert current(role) is Role.ACTIVE
    assert role.split_brains == 1
    run(role, 0.1 + SPLIT_TIMEOUT, 0.1 + SPLIT_TIMEOUT + TICK, other=LOWER)
    assert current(role) is Role.STANDBY
    assert role.stepped_down is StepDown.HIGHER_ADDRESS
    assert not role.may_emit(0.1 + SPLIT_TIMEOUT)
    assert role.step_downs[StepDown.HIGHER_ADDRESS] == 1


def test_split_brain_tie_break_keeps_the_lower_address() -> None:
    role = RoleMachine(ME)
    role.decide(0.0)
    role.streaming(True, 0.05)
    run(role, 0.1, 0.1 + 3 * SPLIT_TIMEOUT, other=HIGHER)
    assert current(role) is Role.ACTIVE
    assert role.split_brains == 1
    assert role.split_brain
    # the other steps down: the split-brain ends GRACE after its last datagram
    last = 0.1 + 3 * SPLIT_TIMEOUT
    assert RoleEvent.SPLIT_BRAIN_RESOLVED in role.decide(last + GRACE + 0.01)
    assert current(role) is Role.ACTIVE
    assert role.split_brains == 1
    assert not role.split_brain


def test_the_host_that_saw_the_other_first_steps_down_at_once() -> None:
    """Seen before this host became active (the one active longer keeps it), whatever the
    addresses."""
    role = RoleMachine(IPv4Address("10.0.0.1"))
    role.saw(HIGHER, 10, 0.0)
    role.decide(0.0)
    assert current(role) is Role.STANDBY
    role.streaming(True, 0.05)  # a connection that got in anyway (fail-open, a race)
    events = role.decide(0.1)
    assert RoleEvent.STEPPED_DOWN in events
    assert current(role) is Role.STANDBY
    assert role.stepped_down is StepDown.SEEN_FIRST
    assert role.split_brains == 1
    assert not role.admits()
    assert not role.may_emit(0.1)
    # stays down while the other emits, even with the stream still open
    run(role, 0.2, 5.0, other=HIGHER)
    assert current(role) is Role.STANDBY
    role.streaming(False, 5.0)
    role.decide(5.0 + GRACE)
    assert current(role) is Role.READY
    assert role.stepped_down is None


def test_at_most_one_of_two_hosts_steps_down_by_seen_first() -> None:
    """Two machines on one timeline: whatever the order of activation and first sightings
    (each sees the other only after the other emits), never both yield by SEEN_FIRST."""
    for a_start, b_start, delay in [(0.0, 0.3, 0.1), (0.3, 0.0, 0.1), (0.0, 0.05, 0.1)]:
        a, b = RoleMachine(LOWER), RoleMachine(HIGHER)
        for m in (a, b):
            m.decide(0.0)
        now = 0.0
        while now < 1.0 + SPLIT_TIMEOUT + 2 * TICK:
            if now >= a_start and current(a) is not Role.ACTIVE and a.stepped_down is None:
                a.streaming(True, now)
            if now >= b_start and current(b) is not Role.ACTIVE and b.stepped_down is None:
                b.streaming(True, now)
            if (
                current(a) is Role.ACTIVE
                and a.active_since is not None
                and now >= a.active_since + delay
            ):
                b.saw(LOWER, 1, now)
            if (
                current(b) is Role.ACTIVE
                and b.active_since is not None
                and now >= b.active_since + delay
            ):
                a.saw(HIGHER, 1, now)
            a.decide(now)
            b.decide(now)
            now = round(now + TICK / 2, 6)
        actives = [m for m in (a, b) if current(m) is Role.ACTIVE]
        assert len(actives) == 1, (a_start, b_start, a, b)
        assert [a.stepped_down, b.stepped_down].count(StepDown.SEEN_FIRST) <= 1


def test_a_host_that_wakes_to_another_relay_steps_down_without_emitting() -> None:
    """Frozen past the lease while another took over: the first decision after the drain
    closes the gate for good; the backlog never goes out."""
    role = RoleMachine(LOWER)  # the lower address: the tie-break alone would keep it
    role.decide(0.0)
    role.streaming(True, 0.0)
    run(role, 0.0, 10.0)
    assert current(role) is Role.ACTIVE
    assert role.may_emit(10.0 - TICK)
    # frozen from 10.0 to 13.0: the other relay emitted meanwhile (queued in the socket)
    assert not role.may_emit(13.0)  # the pump finds the lease stale on waking
    role.saw(HIGHER, 500, 13.0)
    events = role.decide(13.0)
    assert RoleEvent.STEPPED_DOWN in events
    assert role.stepped_down is StepDown.WOKE_TO_ANOTHER
    assert not role.may_emit(13.0)


def test_a_host_that_wakes_alone_goes_on() -> None:
    role = RoleMachine(ME)
    role.decide(0.0)
    role.streaming(True, 0.0)
    run(role, 0.0, 2.0)
    assert not role.may_emit(5.0)  # a 3 s freeze
    assert role.decide(5.0) == []
    assert current(role) is Role.ACTIVE
    assert role.may_emit(5.0)


def test_a_longer_grace_keeps_a_quiet_feeds_standby() -> None:
    """A feed silent for seconds between heartbeats: with emitter_grace above the silence the
    standby does not turn ready between them."""
    role = RoleMachine(ME, grace=6.0)
    for beat in (0.0, 5.0, 10.0):  # a heartbeat every 5 s
        role.saw(LOWER, 1, beat)
        for step in range(50):
            role.decide(beat + step * TICK)
            assert current(role) is Role.STANDBY
    role.decide(10.0 + 6.01)
    assert current(role) is Role.READY


# -- the claim (beacons) ----------------------------------------------------------------------


def claiming(address: IPv4Address, claim: float = CLAIM) -> RoleMachine:
    role = RoleMachine(address, claim=claim)
    role.decide(0.0)
    return role


def test_a_stream_first_claims_with_the_gate_closed_then_wins_after_the_claim() -> None:
    role = claiming(ME)
    assert role.beacon_state() is None  # ready: nothing to announce
    events = role.streaming(True, 0.05)
    assert events == [RoleEvent.BECAME_CLAIMING]
    assert current(role) is Role.CLAIMING
    assert role.beacon_state() is BeaconState.CLAIMING
    assert role.admits()
    assert not role.may_emit(0.05)  # the gate closes at once: nothing emitted, nothing ACKed
    role.decide(0.05 + CLAIM - 0.01)
    assert current(role) is Role.CLAIMING
    assert not role.may_emit(0.05 + CLAIM - 0.01)
    role.streaming(True, 0.05 + CLAIM + 0.01)  # Trio's calls never end a claim
    assert current(role) is Role.CLAIMING
    events = role.decide(0.05 + CLAIM + 0.02)
    assert events == [RoleEvent.BECAME_ACTIVE]
    assert role.may_emit(0.05 + CLAIM + 0.02)
    assert role.beacon_state() is BeaconState.ACTIVE
    assert role.gate_opened
    assert role.claims == {ClaimOutcome.WON: 1, ClaimOutcome.YIELDED: 0}
    assert role.split_brains == 0


def test_two_hosts_claiming_at_once_the_higher_address_yields_before_anything_is_emitted() -> None:
    """Both get a stream in the same tick (two capture hosts spread by the NLB before any
    datagram): each hears the other's beacon; the higher yields at once, the lower wins."""
    low, high = claiming(LOWER), claiming(HIGHER)
    low.streaming(True, 0.0)
    high.streaming(True, 0.0)
    now = 0.0
    emitted_by = set()
    while now < 2.0:
        # beacons sent at this tick are drained at the next one
        said = {m.address: m.beacon_state() for m in (low, high)}
        now = round(now + TICK, 6)
        for machine, other in ((low, HIGHER), (high, LOWER)):
            state = said[other]
            if state is not None:
                machine.beacon(other, state, False, now)
            machine.decide(now)
            if machine.may_emit(now):
                emitted_by.add(machine.address)
    assert emitted_by == {LOWER}  # the higher never opened its gate
    assert current(low) is Role.ACTIVE
    assert current(high) is Role.STANDBY
    assert high.stepped_down is StepDown.YIELDED
    assert not high.admits()
    assert high.claims[ClaimOutcome.YIELDED] == 1
    assert low.claims[ClaimOutcome.WON] == 1
    assert (low.split_brains, high.split_brains) == (0, 0)
    assert high.step_downs == dict.fromkeys(high.step_downs, 0)  # a yield is no step-down
    reason = high.reason(now)
    assert reason is not None
    assert str(LOWER) in reason


def test_a_claim_yields_to_an_active_beacon_or_to_data() -> None:
    for how in ("beacon", "data"):
        role = claiming(LOWER)  # the lower address: the tie-break alone would keep it
        role.streaming(True, 0.0)
        if how == "beacon":
            role.beacon(HIGHER, BeaconState.ACTIVE, True, 0.1)
        else:
            role.saw(HIGHER, 3, 0.1)
        events = role.decide(0.1)
        assert RoleEvent.CLAIM_YIELDED in events, how
        assert current(role) is Role.STANDBY
        assert not role.may_emit(0.1)
        assert role.split_brains == 0  # never active: no split-brain
        assert role.claims[ClaimOutcome.YIELDED] == 1


def test_a_claim_from_a_higher_address_does_not_make_a_claim_yield() -> None:
    role = claiming(ME)
    role.streaming(True, 0.0)
    now = 0.0
    while now < CLAIM + 2 * TICK:
        now = round(now + TICK, 6)
        role.beacon(HIGHER, BeaconState.CLAIMING, False, now)
        role.decide(now)
    assert current(role) is Role.ACTIVE
    assert role.split_brains == 0  # a claimant is not a relay that emits


def test_an_active_beacon_keeps_a_standby_without_any_data() -> None:
    """Before any datagram flows, the active host's beacons alone make the others standby,
    so the NLB sends every capture host's connection to the active one."""
    role = claiming(ME)
    for step in range(30):
        role.beacon(HIGHER, BeaconState.ACTIVE, False, step * TICK)
        role.decide(step * TICK)
        assert current(role) is Role.STANDBY
        assert not role.admits()
    reason = role.reason(3.0)
    assert reason is not None
    assert str(HIGHER) in reason
    role.decide(2.9 + GRACE + 0.01)
    assert current(role) is Role.READY


def test_a_claimant_makes_a_ready_host_standby_and_its_silence_ready_again() -> None:
    role = claiming(ME)
    role.beacon(HIGHER, BeaconState.CLAIMING, False, 0.0)
    role.decide(0.0)
    assert current(role) is Role.STANDBY
    role.decide(GRACE + 0.01)
    assert current(role) is Role.READY


def test_a_takeover_claims_too() -> None:
    """The active host dies: silent for GRACE, this host turns ready; the capture side's
    connection then makes it claim before it emits."""
    role = claiming(ME)
    now = run(role, 0.0, 1.0, other=LOWER)
    assert current(role) is Role.STANDBY
    now = run(role, now, now + GRACE + TICK)
    assert current(role) is Role.READY
    role.streaming(True, now)
    assert current(role) is Role.CLAIMING
    assert not role.may_emit(now)
    run(role, now, now + CLAIM + 2 * TICK)
    assert current(role) is Role.ACTIVE


def test_losing_the_stream_while_claiming_abandons_the_claim() -> None:
    role = claiming(ME)
    role.streaming(True, 0.0)
    role.streaming(False, 0.1)
    assert current(role) is Role.READY
    assert role.claims == {ClaimOutcome.WON: 0, ClaimOutcome.YIELDED: 0}
    assert role.beacon_state() is None


def test_without_a_claim_period_a_stream_is_active_at_once_and_nothing_is_announced() -> None:
    role = RoleMachine(ME)
    role.decide(0.0)
    assert role.streaming(True, 0.0) == [RoleEvent.BECAME_ACTIVE]
    assert role.beacon_state() is None


def test_a_real_split_brain_between_claimed_hosts_keeps_the_tie_break() -> None:
    """A partition: both claimed and won without hearing each other; when it heals, each
    sees the other's ACTIVE beacons and data: a split-brain, counted, resolved by address."""
    role = claiming(ME)
    role.streaming(True, 0.0)
    now = run(role, 0.0, 1.0)
    assert current(role) is Role.ACTIVE
    role.beacon(LOWER, BeaconState.ACTIVE, True, now)
    events = role.decide(now)
    assert RoleEvent.SPLIT_BRAIN in events
    assert current(role) is Role.ACTIVE
    run(role, now, now + SPLIT_TIMEOUT + TICK, other=LOWER)
    assert role.stepped_down is StepDown.HIGHER_ADDRESS
    assert role.split_brains == 1
