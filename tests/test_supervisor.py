"""The supervisor's side of --workers in-process: its messages, and the steps after a worker exits."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Iterator, List

import pytest

import dsreceiver
from conftest import wait_until
from dsreceiver import (Claim, ClaimAnswer, Commit, MetricsAnswer, MetricsRequest, Recovered, Release, SnapshotAnswer,
                        SnapshotRequest)


class WorkerEnd:
    """The worker's end of a slot's control channel, read by the test."""

    def __init__(self, sock: socket.socket) -> None:
        self.channel = dsreceiver.ControlChannel(sock)
        sock.settimeout(5)
        self.pending: List[dsreceiver.Message] = []

    def receive(self) -> dsreceiver.Message:
        while not self.pending:
            self.pending = self.channel.feed(self.channel.sock.recv(65536))
        return self.pending.pop(0)

    def nothing_waiting(self) -> bool:
        self.channel.sock.setblocking(False)
        try:
            return not self.pending and not self.channel.sock.recv(65536)
        except BlockingIOError:
            return True
        finally:
            self.channel.sock.settimeout(5)


@pytest.fixture
def supervisor(tmp_path: Path) -> Iterator[dsreceiver.Supervisor]:
    layout = dsreceiver.Layout(tmp_path)
    layout.create()
    listeners = [socket.socket(), socket.socket()]
    chief = dsreceiver.Supervisor([[listener] for listener in listeners], layout, dsreceiver.DedupeMemory(900),
                                  lambda *args: 0)
    yield chief
    for slot in chief.slots:
        slot.ended()
    for listener in listeners:
        listener.close()


def turn(supervisor: dsreceiver.Supervisor, index: int, message: dsreceiver.Message) -> None:
    """One message from worker `index`, as one turn of the supervisor's loop handles it: answers go out at its end."""
    supervisor.handle(index, message)
    supervisor.flush_outbox()


def attach(supervisor: dsreceiver.Supervisor) -> List[WorkerEnd]:
    """Gives every slot a (pretend) running worker: a control channel whose other end the test holds."""
    ends = []
    for slot in supervisor.slots:
        ours, theirs = socket.socketpair()
        slot.started(0, dsreceiver.ControlChannel(ours))
        ends.append(WorkerEnd(theirs))
    return ends


def test_a_claimed_batch_makes_other_claims_wait_for_its_outcome(supervisor: dsreceiver.Supervisor) -> None:
    first, second = attach(supervisor)
    turn(supervisor, 0, Claim(1, "-/batch"))
    assert first.receive() == ClaimAnswer(1, "granted")
    turn(supervisor, 1, Claim(7, "-/batch"))
    # At once: "wait", so that worker 2's other claims go ahead; the verdict waits for worker 1's outcome.
    assert second.receive() == ClaimAnswer(7, "waiting")
    assert second.nothing_waiting()
    turn(supervisor, 0, Commit("-/batch", time.time()))
    assert second.receive() == ClaimAnswer(7, "duplicate")


def test_a_released_claim_passes_to_the_next_worker_waiting(supervisor: dsreceiver.Supervisor) -> None:
    first, second = attach(supervisor)
    turn(supervisor, 0, Claim(1, "-/batch"))
    first.receive()
    turn(supervisor, 1, Claim(2, "-/batch"))
    assert second.receive() == ClaimAnswer(2, "waiting")
    turn(supervisor, 0, Release("-/batch"))
    assert second.receive() == ClaimAnswer(2, "granted")  # worker 2 stores it now
    assert supervisor.owners == {"-/batch": 1}


def test_metrics_are_gathered_from_every_worker_and_merged(supervisor: dsreceiver.Supervisor) -> None:
    first, second = attach(supervisor)
    turn(supervisor, 1, MetricsRequest(5, dsreceiver.SnapshotScope.FULL))
    requests = [first.receive(), second.receive()]
    assert isinstance(requests[0], SnapshotRequest) and requests == [requests[0]] * 2
    gathering = requests[0].id
    for index, records in ((0, 3), (1, 4)):
        snapshot = dsreceiver.MetricsSnapshot(counters={"records_stored": records})
        turn(supervisor, index, SnapshotAnswer(gathering, snapshot))
    answer = second.receive()
    assert isinstance(answer, MetricsAnswer) and answer.id == 5
    assert answer.snapshot.counters == {"records_stored": 7, "worker_restarts": 0}


def test_a_dead_workers_claims_wait_in_doubt_until_its_successor_says_what_its_files_hold(
        supervisor: dsreceiver.Supervisor, monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = attach(supervisor)
    respawned: List[int] = []
    monkeypatch.setattr(supervisor, "spawn", lambda slot: respawned.append(slot.index))  # no process to fork
    # Worker 1 claims two batches, stores one, and dies before it can send either Commit.
    stored, lost = "-/" + "01" * 32, "-/" + "02" * 32
    turn(supervisor, 0, Claim(1, stored))
    turn(supervisor, 0, Claim(2, lost))
    assert [first.receive(), first.receive()] == [ClaimAnswer(1, "granted"), ClaimAnswer(2, "granted")]
    turn(supervisor, 1, Claim(8, stored))  # DataStream's retries reach worker 2 meanwhile
    turn(supervisor, 1, Claim(9, lost))
    assert [second.receive(), second.receive()] == [ClaimAnswer(8, "waiting"), ClaimAnswer(9, "waiting")]
    supervisor.after_exit(supervisor.slots[0], -9)
    supervisor.flush_outbox()
    # The supervisor read no file: the retries wait, in doubt, and the live worker's other claims are answered.
    assert respawned == [0] and second.nothing_waiting()
    turn(supervisor, 1, Claim(10, "-/fresh"))
    assert second.receive() == ClaimAnswer(10, "granted")
    # The restarted worker recovered its predecessor's files: the stored batch is there, the other is not.
    ours, theirs = socket.socketpair()
    supervisor.slots[0].started(0, dsreceiver.ControlChannel(ours))
    turn(supervisor, 0, Recovered([(time.time(), stored)]))
    answers = {second.receive(), second.receive()}
    assert answers == {ClaimAnswer(8, "duplicate"), ClaimAnswer(9, "granted")}  # never stored twice, never lost
    assert supervisor.owners == {"-/fresh": 1, lost: 1} and supervisor.slots[0].doubtful == set()
    theirs.close()


def test_a_worker_that_dies_while_stopping_keeps_its_claims_held(supervisor: dsreceiver.Supervisor) -> None:
    first, second = attach(supervisor)
    turn(supervisor, 0, Claim(1, "-/batch"))
    first.receive()
    turn(supervisor, 1, Claim(9, "-/batch"))
    assert second.receive() == ClaimAnswer(9, "waiting")
    supervisor.stopping = True  # nobody will recover its files now: the next start learns what was stored
    supervisor.after_exit(supervisor.slots[0], -9)
    supervisor.flush_outbox()
    # Never granted (its batch may be durable already): the waiting push gets a 503 at its deadline.
    assert second.nothing_waiting() and supervisor.owners == {"-/batch": 0}


def test_after_an_exit_nothing_waits_for_its_snapshot(supervisor: dsreceiver.Supervisor) -> None:
    first, second = attach(supervisor)
    turn(supervisor, 1, MetricsRequest(3, dsreceiver.SnapshotScope.HEALTH))
    request = first.receive()
    assert isinstance(request, SnapshotRequest) and request.scope is dsreceiver.SnapshotScope.HEALTH
    assert second.receive() == request
    gathering = request.id
    turn(supervisor, 1, SnapshotAnswer(gathering, dsreceiver.MetricsSnapshot(counters={"records_stored": 2})))
    supervisor.stopping = True
    supervisor.after_exit(supervisor.slots[0], 0)
    supervisor.flush_outbox()
    answer = second.receive()
    assert isinstance(answer, MetricsAnswer) and answer.snapshot.counters == {"records_stored": 2, "worker_restarts": 0}


def test_a_worker_that_keeps_exiting_is_a_crash_loop() -> None:
    slot = dsreceiver.WorkerSlot(0)
    now = 1000.0
    assert not any(slot.crash_looping(now + step) for step in range(dsreceiver.CRASH_LOOP_RESTARTS))
    assert slot.crash_looping(now + dsreceiver.CRASH_LOOP_RESTARTS)
    assert not dsreceiver.WorkerSlot(1).crash_looping(now) and slot.tag == ".w1"


def test_answers_queued_for_a_dead_worker_never_reach_its_successor(supervisor: dsreceiver.Supervisor) -> None:
    attach(supervisor)
    supervisor.handle(0, Claim(5, "-/queued"))  # answered at the end of the loop's turn...
    supervisor.stopping = True
    supervisor.after_exit(supervisor.slots[0], -9)  # ...but the worker died first
    ours, theirs = socket.socketpair()
    supervisor.slots[0].started(0, dsreceiver.ControlChannel(ours))  # its successor, whose request 5 is another
    successor = WorkerEnd(theirs)
    supervisor.flush_outbox()
    assert successor.nothing_waiting()


def test_a_worker_claims_a_group_in_one_write_and_waits_only_for_a_held_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    stops: List[int] = []
    monkeypatch.setattr(os, "kill", lambda pid, signum: stops.append(signum))  # what a gone supervisor does
    ours, theirs = socket.socketpair()
    client = dsreceiver.SupervisorClient(ours)
    client.start(lambda scope: dsreceiver.MetricsSnapshot())
    supervisor_end = WorkerEnd(theirs)
    tickets: List[dsreceiver.ClaimTicket] = []
    claiming = threading.Thread(target=lambda: tickets.extend(client.claim_all(["-/fresh", "-/held"])))
    claiming.start()
    claims = [claim for claim in supervisor_end.channel.feed(theirs.recv(65536)) if isinstance(claim, Claim)]
    assert [claim.key for claim in claims] == ["-/fresh", "-/held"]  # both claims, in one write
    supervisor_end.channel.send_all([ClaimAnswer(claims[0].id, "granted"), ClaimAnswer(claims[1].id, "waiting")])
    claiming.join(10)
    assert [ticket.state for ticket in tickets] == [dsreceiver.ClaimState.GRANTED, dsreceiver.ClaimState.WAITING]
    finals: List[dsreceiver.ClaimState] = []
    waiting = threading.Thread(target=lambda: finals.append(tickets[1].outcome()))
    waiting.start()
    supervisor_end.channel.send(ClaimAnswer(claims[1].id, "duplicate"))  # the other worker stored it
    waiting.join(10)
    assert finals == [dsreceiver.ClaimState.DUPLICATE]  # not stored again
    client.commit_all([("-/fresh", 1.0)])
    [commit] = supervisor_end.channel.feed(theirs.recv(65536))
    assert commit == Commit("-/fresh", 1.0)
    theirs.close()  # the supervisor is gone: the worker stops, and a claim now fails at once
    wait_until(lambda: stops == [signal.SIGTERM], what="the worker stopping itself")
    with pytest.raises(dsreceiver.SupervisorGone):
        client.claim_all(["-/late"])


def test_a_dead_workers_waiting_claim_is_forgotten(supervisor: dsreceiver.Supervisor) -> None:
    first, second = attach(supervisor)
    turn(supervisor, 0, Claim(1, "-/batch"))
    assert first.receive() == ClaimAnswer(1, "granted")
    turn(supervisor, 1, Claim(4, "-/batch"))
    assert second.receive() == ClaimAnswer(4, "waiting")  # waits for worker 1's outcome...
    supervisor.stopping = True
    supervisor.after_exit(supervisor.slots[1], -9)  # ...but dies first
    ours, theirs = socket.socketpair()
    supervisor.slots[1].started(0, dsreceiver.ControlChannel(ours))
    successor = WorkerEnd(theirs)
    turn(supervisor, 0, Release("-/batch"))  # worker 1 failed to store it: nobody else waits for it
    assert successor.nothing_waiting() and supervisor.owners == {} and supervisor.waiting == {}
    turn(supervisor, 1, Claim(4, "-/batch"))  # the successor's own request 4
    assert successor.receive() == ClaimAnswer(4, "granted")
