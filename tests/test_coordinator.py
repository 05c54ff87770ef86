"""The master's state machine without sockets: made-up sequences of real messages and times.

Each test feeds ``Coordinator`` decoded messages (``protocol.decode(encode(...))``, what the
shell would receive) and the passing of time, and checks what it answers: a join, a round,
a straggler and its backup, a worker lost mid-round whose blocks are computed again, a stale
RESULT of an older round, a BYE.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from qsae import __version__, tree
from qsae.coordinator import Coordinator
from qsae.errors import NumericalError, WorkerError
from qsae.layout import Layout
from qsae.model import SAEConfig
from qsae.protocol import BLOCKS, BYE, DROP, ERROR, EVAL, HELLO, PING, PONG, READY, RESULT, SOURCE, decode, encode
from qsae.reduce import OP_TABLE
from qsae.throttle import Throttle

pytestmark = pytest.mark.timeout(30)
CFG = SAEConfig()
M, BLOCK = 800, 100  # 8 blocks
B = M // BLOCK
TIMEOUT = 5.0


def msg(type: str, round: int = 0, arrays=(), **fields):
    return decode(encode(type, round, arrays, **fields))


def hello(name: str, **extra):
    return msg(HELLO, name=name, host="node", pid=1, cores=1, version=__version__, blas="openblas", **extra)


class Cluster:
    """A coordinator and the made-up leaves (one result row per block) its workers compute."""

    def __init__(self, names=("a", "b"), kind: str = "images") -> None:
        layout = Layout(CFG, np.dtype("float64"), "measured", BLOCK)
        source = {"kind": kind, "images": [], "patch_size": 8, "seed": 0, "sigma": 1.0}
        if kind == "array":
            source["X"] = np.zeros((M, CFG.n_visible))
        layout.set_source(source, M)
        self.events: list[dict] = []
        self.c = Coordinator(layout, heartbeat=1.0, worker_timeout=TIMEOUT, on_event=self.events.append)
        self.now = 0.0
        self.width = OP_TABLE["sums"].width(CFG)
        rng = np.random.default_rng(0)
        self.leaves = {(0, b): rng.standard_normal(self.width) for b in range(B)}
        self.ids = {name.encode(): name for name in names}
        for ident, name in self.ids.items():
            assert self.feed(ident, hello(name)) == []

    def feed(self, ident: bytes, m, dt: float = 0.0):
        self.now += dt
        return self.c.handle(ident, m, self.now)

    def settle(self) -> list:
        """Settle, every worker answering READY at once; the messages sent on the way."""
        sent = []
        while (sends := self.c.settle_step(self.now)) is not None:
            sent += sends
            for s in sends:
                if s.type in (SOURCE, BLOCKS) and s.round:
                    self.feed(s.ident, msg(READY, s.round, ids=s.fields.get("ids", []), seconds=0.01), dt=0.01)
            assert not self.c.waiting
        return sent

    def result(self, ident: bytes, r: int, ids: list[int], dt: float = 0.01, value=None):
        nodes = tree.cover(ids, B)
        rows = np.array([tree.value(n, self.leaves, B) for n in nodes]) if value is None else value
        return self.feed(ident, msg(RESULT, r, [rows], spans=tree.flat(tree.runs(sorted(ids))),
                                    nodes=[tree.code(n) for n in nodes],
                                    rows=BLOCK * len(ids), seconds=0.01), dt=dt)

    def total(self) -> np.ndarray:
        return tree.value(tree.root(B), self.leaves, B)

    def held(self) -> dict[bytes, list[int]]:
        return {i: sorted(w.blocks) for i, w in self.c.workers.items()}


def test_a_join_gets_the_source_then_every_block():
    k = Cluster()
    sent = k.settle()
    assert [s.type for s in sent[:2]] == [SOURCE, SOURCE] and sent[0].fields["m"] == M
    assert {s.type for s in sent[2:]} <= {BLOCKS, DROP}
    held = k.held()
    assert sorted(b for ids in held.values() for b in ids) == list(range(B)) and all(held.values())
    assert {s["state"] for s in k.c.members.status()} == {"active"}
    assert [e["event"] for e in k.events] == ["join", "join", "move"]
    assert k.c.settle_step(k.now) is None  # nothing left to do


def test_a_round_adds_along_the_tree_and_a_stale_result_is_dropped():
    k = Cluster()
    k.settle()
    theta = np.ones(CFG.n_params)
    sends = k.c.begin_round("sums", theta, k.now)
    assert {s.type for s in sends} == {EVAL} and {s.ident: tree.blocks_of(tree.pairs(s.fields["spans"])) for s in sends} == k.held()
    r = sends[0].round
    a, b = k.held().items()
    k.result(a[0], r - 1, a[1])  # a RESULT of an older round: dropped, nothing counted
    assert k.c.waiting and k.c.wait.rnd.covered == set()
    k.result(a[0], r, a[1])
    assert k.c.waiting
    k.result(b[0], r, b[1])
    assert not k.c.waiting
    ((rows, total),) = k.c.end_round()
    assert rows == M
    np.testing.assert_array_equal(total, k.total())
    assert k.result(b[0], r, b[1]) == [] and k.c.wait is None  # its late copy: dropped between rounds


def test_a_straggler_is_backed_up_by_the_idle_worker():
    k = Cluster()
    k.settle()
    sends = k.c.begin_round("sums", np.ones(CFG.n_params), k.now)
    r = sends[0].round
    (a, ida), (b, idb) = k.held().items()
    k.result(a, r, ida, dt=0.1)  # a took 0.1 s: b is late past 2 × 0.1 + 0.1 s
    assert k.c.tick(k.now + 0.2) == []
    backup = k.c.tick(k.now + 0.31)
    asked = [(s.ident, s.type, s.round, tree.blocks_of(tree.pairs(s.fields["spans"]))) for s in backup]
    assert asked == [(a, EVAL, r, idb)]
    assert k.c.stats["backups"] == 1 and k.c.backups_by["a"] == len(idb)
    k.result(a, r, idb, dt=0.35)
    assert not k.c.waiting
    np.testing.assert_array_equal(k.c.end_round()[0][1], k.total())
    assert b in k.c.workers  # late, not lost


def test_a_worker_lost_mid_round_has_its_blocks_computed_again():
    k = Cluster()
    k.settle()
    sends = k.c.begin_round("sums", np.ones(CFG.n_params), k.now)
    r = sends[0].round
    (a, ida), (b, idb) = k.held().items()
    k.result(a, r, ida)
    k.feed(a, msg(PING, busy=False), dt=TIMEOUT - 1)  # a stays heard from; b says nothing
    assert k.c.tick(k.now + TIMEOUT) == [] and not k.c.waiting
    assert k.c.end_round() is None  # lost: the evaluation runs again
    assert b not in k.c.workers and [s["state"] for s in k.c.members.status() if s["name"] == "b"] == ["lost"]
    sent = k.settle()  # b's blocks go to a
    assert [(s.ident, s.type) for s in sent] == [(a, BLOCKS)] and sent[0].fields["ids"] == idb
    assert k.held() == {a: list(range(B))}
    sends = k.c.begin_round("sums", np.ones(CFG.n_params), k.now)
    k.result(a, sends[0].round, list(range(B)))
    np.testing.assert_array_equal(k.c.end_round()[0][1], k.total())
    assert [e["event"] for e in k.events][-2:] == ["lost", "move"]


def test_a_bye_hands_the_blocks_over_before_the_next_round():
    k = Cluster(kind="array")
    k.settle()
    (a, ida), (b, idb) = k.held().items()
    assert k.feed(b, msg(BYE)) == []
    assert [s["state"] for s in k.c.members.status() if s["name"] == "b"] == ["leaving"]
    sent = k.settle()
    assert [s.type for s in sent] == [BLOCKS] and len(sent[0].arrays) == len(idb)  # array rows travel
    assert k.held() == {a: list(range(B))}


def test_a_round_without_holders_is_lost_at_once_and_errors_are_raised():
    k = Cluster()
    k.settle()
    (a, ida), (b, idb) = k.held().items()
    k.feed(b, msg(BYE))
    assert k.c.begin_round("sums", np.ones(CFG.n_params), k.now) is None  # never a partial sum
    k.settle()
    sends = k.c.begin_round("sums", np.ones(CFG.n_params), k.now)
    k.feed(a, msg(ERROR, sends[0].round, etype="ValueError", message="boom", traceback="tb", host="node"))
    assert not k.c.waiting
    with pytest.raises(WorkerError, match="boom"):
        k.c.end_round()
    sends = k.c.begin_round("sums", np.ones(CFG.n_params), k.now)  # the next round runs
    k.result(a, sends[0].round, list(range(B)), value=np.full((1, k.width), np.nan))
    with pytest.raises(NumericalError, match="NaN"):
        k.c.end_round()


def test_pings_hello_fields_and_strangers():
    k = Cluster(names=("a",))
    assert k.feed(b"a", msg(PONG)) == []
    (pong,) = k.feed(b"a", msg(PING, busy=False))
    assert (pong.ident, pong.type) == (b"a", PONG)
    assert [s.ident for s in k.c.tick(k.now + 1.0)] == [b"a"]  # an idle worker is pinged every heartbeat
    k.c.sent(b"a", k.now + 1.0)
    assert k.c.tick(k.now + 1.5) == []
    (err,) = k.feed(b"x", msg(READY, 1, ids=[], seconds=0.0))
    assert err.type == ERROR and "never said HELLO" in err.fields["message"]
    k.feed(b"h", hello("host-agent", procs=4))
    assert {s["name"]: s["procs"] for s in k.c.members.status()} == {"a": None, "host-agent": 4}


def test_a_flood_of_rejected_messages_is_one_line_per_interval_with_its_count(caplog):
    """Garbage at 100 messages a second for 25 s: every one answered with ERROR, but the log
    says a line per REJECT_LOG_SECONDS (10 s), the later ones with how many they stand for."""
    k = Cluster(names=("a",))
    with caplog.at_level("WARNING", logger="qsae.master"):
        answers = [k.feed(b"x", msg(READY, 1, ids=[], seconds=0.0), dt=0.01) for _ in range(2500)]
    assert all(a[0].type == ERROR for a in answers)
    lines = [r.getMessage() for r in caplog.records if "rejected a message" in r.getMessage()]
    assert len(lines) == 3, lines  # at 0.01 s, 10.01 s and 20.01 s
    assert "more rejected" not in lines[0]
    counts = [int(re.search(r"\((\d+) more rejected since the last such line\)", ln).group(1)) for ln in lines[1:]]
    assert all(998 <= n <= 1000 for n in counts), lines  # 10 s of 100 a second (the clock's sums round)


def test_a_throttle_counts_what_each_line_stands_for():
    t = Throttle(10.0)
    assert [t.due(s) for s in (0.0, 1.0, 9.9, 10.0, 10.5, 25.0)] == [1, None, None, 3, None, 2]


def test_a_result_of_another_model_drops_its_worker_and_the_round_runs_again():
    k = Cluster()
    k.settle()
    sends = k.c.begin_round("sums", np.ones(CFG.n_params), k.now)
    r = sends[0].round
    (a, ida), (b, idb) = k.held().items()
    nodes = tree.cover(idb, B)
    k.result(b, r, idb, value=np.zeros((len(nodes), k.width + 1)))  # one column too many
    assert b not in k.c.workers and k.c.waiting
    k.result(a, r, ida)
    assert k.c.tick(k.now) == [] and k.c.end_round() is None  # b's blocks are not covered: lost
    k.settle()
    assert k.held() == {a: list(range(B))}


@pytest.mark.parametrize("bad", ["leaves", "past the end", "out of order"])
def test_a_result_whose_nodes_are_not_its_ranges_is_refused(bad):
    """A RESULT must send the tree nodes its ranges make (checked over the ranges, not the
    blocks): rows of other nodes, ranges past the data set or nodes out of order drop the
    worker, and the round is not added up from them."""
    k = Cluster()
    k.settle()
    sends = k.c.begin_round("sums", np.ones(CFG.n_params), k.now)
    r = sends[0].round
    (a, ida), _ = k.held().items()
    lo, hi = ida[0], ida[-1] + 1
    nodes = {"leaves": [(0, b) for b in ida],  # one row per block where fewer nodes cover them
             "past the end": tree.cover(ida, B),
             "out of order": [(0, lo + 1), (0, lo)]}[bad]
    spans = {"leaves": [lo, hi], "past the end": [lo, hi + B], "out of order": [lo, lo + 2]}[bad]
    rows = np.ones((len(nodes), k.width))
    k.feed(a, msg(RESULT, r, [rows], spans=spans, nodes=[tree.code(n) for n in nodes], rows=BLOCK * len(ida),
                  seconds=0.01))
    assert a not in k.c.workers  # dropped: its blocks go to the others
    assert k.c.tick(k.now) == [] and not k.c.waiting and k.c.end_round() is None  # the round is lost
