"""The cluster fault suite (issue 17, reliability-cases.md B.4): faults on a 3-node R3 cluster with
``sync_interval: always`` under a steady paced load of submits (~4/s, runs of 1-1.5 s), each
execution counted outside the system, every submit in a ledger (ok / refused / unknown).

After each case (pyoco_es.testing.ledger.check): unknown outcomes resolved by retrying with the
same Idempotency-Key; every ok run ended, with exactly one terminal event and nothing after it;
nothing stored that no client got a 2xx for; executions <= attempts recorded; ``pyoco-es replay``
finds no difference; nothing stuck (every run ended within ``SETTLE`` s after the load stopped,
above the lease plus the reaper's grace and the slowest election).  The ledger figures are printed
(run with ``-s`` to see them).

The cases share one cluster and one fleet (2 gateways, 2 conductors, 3 workers); each case heals
what it broke before it checks.  Waits for state poll with a deadline; the sleeps are the load's
duration around a fault (the scenario), not waits for state.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import pytest

from conftest import CLUSTER_ENV, ClusterSystem
from pyoco_es.core.errors import InfraError
from pyoco_es.testing.fleet import wait_for
from pyoco_es.testing.ledger import Figures, Ledger, Submitter, check, side_effect_flow

pytestmark = pytest.mark.cluster

EVENTS = "PYOCO_EVENTS"
LEASE = float(CLUSTER_ENV["PYOCO_RUN_LEASE_SEC"])
SETTLE = 45.0  # lease + reaper grace + an election or two + the runs themselves, with room for a loaded CI box
WARMUP, AFTER = 1.5, 2.5  # seconds of load before the fault and after it is healed


def _loaded(system: ClusterSystem, case: str, fault: Callable[[], None]) -> Figures:
    """``fault()`` under load, then the ledger's checks; returns the figures."""
    _all_current(system)
    ledger = Ledger(case, system.effects(case))
    submitter = Submitter(ledger, system.fleet.gateways, rate=4.0, seconds=(1.0, 1.5))
    submitter.start()
    try:
        time.sleep(WARMUP)
        fault()
        time.sleep(AFTER)
    finally:
        submitter.stop()
    figures = check(ledger, system.fleet.gateways, system.cluster.urls, settle=SETTLE, case=case)
    assert figures.ok >= 5, figures  # the fault happened under load (a fast election leaves a short window)
    assert not system.fleet.tracebacks(), system.fleet.tracebacks()
    return figures


def _all_current(system: ClusterSystem) -> None:
    """Wait until every stream has a leader and both followers caught up (between faults)."""
    streams = system.cluster.stream_names()

    def current() -> bool:
        try:
            return all(len(system.cluster.replicas(s)[1]) == 3 for s in streams)
        except InfraError:  # no node answered the stream info (an election under way): not yet
            return False

    wait_for("every stream's replicas to be current", current, 60, every=0.2)


def test_1_and_7_kill_the_events_leader_a_gateway_and_a_conductor(cluster_system: ClusterSystem) -> None:
    system = cluster_system
    old = system.cluster.leader(EVENTS)

    def fault() -> None:
        system.cluster.kill(old)
        system.fleet.kill("g1")
        system.fleet.kill("c1")
        t0 = time.monotonic()
        new = system.cluster.leader(EVENTS)
        print(f"case 1: {old} killed, {new} leads {EVENTS} after {time.monotonic() - t0:.1f} s", flush=True)
        assert new != old
        time.sleep(AFTER)
        system.cluster.restart(old)
        system.fleet.restart("g1")
        system.fleet.restart("c1")

    _loaded(system, "c1", fault)


def test_2_kill_a_node_that_leads_nothing_of_ours(cluster_system: ClusterSystem) -> None:
    system = cluster_system
    victim = next(n.name for n in system.cluster.nodes if n.name != system.cluster.leader(EVENTS))

    def fault() -> None:
        system.cluster.kill(victim)
        time.sleep(AFTER)
        system.cluster.restart(victim)

    _loaded(system, "c2", fault)


def test_3_freeze_the_events_leader_past_the_election_timeout(cluster_system: ClusterSystem) -> None:
    system = cluster_system
    old = system.cluster.leader(EVENTS)

    def fault() -> None:
        system.cluster.freeze(old)
        try:
            others = [n.name for n in system.cluster.nodes if n.name != old]
            new = wait_for("another node to lead while the leader is frozen",
                           lambda: (lambda lead: lead if lead in others else None)(system.cluster.leader(EVENTS)), 30)  # fmt: skip
            print(f"case 3: {old} frozen, {new} leads {EVENTS}", flush=True)
            time.sleep(1.0)  # frozen a while past the election
        finally:
            system.cluster.thaw(old)
        system.cluster.wait_healthy(old, timeout=60)

    _loaded(system, "c3", fault)


def test_4_and_7_rolling_restart_with_a_gateway_and_a_conductor_killed(cluster_system: ClusterSystem) -> None:
    system = cluster_system

    def fault() -> None:
        for i, node in enumerate(system.cluster.nodes):
            system.cluster.restart(node.name, graceful=True)
            if i == 1:
                system.fleet.kill("g2")
                system.fleet.kill("c2")
            _all_current(system)
        system.fleet.restart("g2")
        system.fleet.restart("c2")

    _loaded(system, "c4", fault)


def test_5_forced_leader_step_down(cluster_system: ClusterSystem) -> None:
    system = cluster_system
    streams = (EVENTS, "PYOCO_WORK", "KV_pyoco_runs", "KV_pyoco_workers")
    before = {s: system.cluster.leader(s) for s in streams}

    def fault() -> None:
        for s in streams:
            system.cluster.step_down(s)
        after = {s: system.cluster.leader(s) for s in streams}
        assert all(after[s] != before[s] for s in streams), (before, after)

    _loaded(system, "c5", fault)


def test_6_a_worker_cut_off_longer_than_its_lease(cluster_system: ClusterSystem) -> None:
    """w3 reaches NATS only through the proxies; cut them for lease + 4 s while w3 runs an attempt
    (a run tagged ``w3only``): the attempt is judged lost and the run is attempted again once w3
    is back; w3's late writes for the old attempt are refused; nothing runs twice per attempt."""
    system = cluster_system
    g = system.fleet.members["g2"].url
    pinned = Ledger("w3only", system.effects("w3only"))
    key = "w3only-held"
    pinned.flows[key] = side_effect_flow(pinned.effects, key, 2.0)

    def fault() -> None:
        with httpx.Client(timeout=15) as client:
            pinned.submit(client, g, key)
            rid = pinned.ok[key]
            wait_for("w3 to run the pinned run", lambda: client.get(f"{g}/runs/{rid}").json()["status"] == "RUNNING", 30)
            for p in system.proxies:
                p.cut()
            try:
                time.sleep(LEASE + 4.0)  # the partition's length: it must outlast the lease
            finally:
                for p in system.proxies:
                    p.heal()

    figures = _loaded(system, "c6", fault)
    pinned_figures = check(pinned, system.fleet.gateways, system.cluster.urls, settle=SETTLE, case="c6-pinned")
    assert pinned_figures.worker_lost >= 1 and pinned_figures.attempts >= 2, pinned_figures
    assert pinned_figures.completed == 1, pinned_figures
    assert figures.claims_by_worker.get("w1", 0) and figures.claims_by_worker.get("w2", 0)
