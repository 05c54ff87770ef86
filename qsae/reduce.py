"""Reducers: how the master turns the workers' replies into (cost, grad).

A reducer knows the math and nothing of sockets. It talks to the workers through one
function the master gives it::

    scatter(op: str, arg: np.ndarray) -> list[tuple[int, np.ndarray]]

which runs the worker operation ``op`` (a key of ``OPS``) with ``arg`` on every shard and
returns each shard's (rows, result vector). The worker side of every operation is in
``OPS``: a function (ShardState, arg) -> vector, pure numpy.

Reducers:

* ``exact`` — equal to ``cost_and_grad(θ, X)`` of the whole data set for any split.
  Two ways (DESIGN.md, "Why the exact protocol is cheap"):
  one round, ``sums``: each shard returns Σ f'xᵀ and Σ f' too (one extra h×n product);
  two rounds, ``forward`` then ``backward``: Σ a2 first, then the sparsity delta s is sent
  and folded into the backward pass (the shard keeps its activations between the rounds).
  One round is the default, for every data set: with the fused kernels it computes about as
  fast as two (on 2 workers two rounds took 0.95–1.18× its time from 20K to 1M patches,
  ``benchmarks/bench_runtime.py --only crossover``), it is one round trip, and it keeps nothing between
  rounds (two keep each block's hidden layer, 0.48 of the rows in memory). ``rounds=2``
  chooses two for a run. The two round differently, so the choice is the run's, never
  anything membership changes.
* ``average`` — the report's ParallelAvgCostFunction: each shard uses its own firing
  rates p_j, and shard results are weighted by their sizes. An approximation.

Each op is one record in ``OP_TABLE`` (``Op``: its worker side, result width, what a worker
keeps for the next round and which earlier op's state it needs); ``OPS`` and ``PER_BLOCK``
are views of it. To add a reducer: register its worker side as an ``Op`` (if the existing
ones do not serve), subclass ``Reducer`` with a ``name`` and ``steps``, and add it to
``REDUCERS``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Generator

import numpy as np

from ._blas import pinned
from .errors import ConfigError, ProtocolError
from .model import (
    SAEConfig,
    Sums,
    backward,
    cost_and_grad,
    finish_sums,
    hidden_exp,
    hidden_sums,
    shard_sums,
    sparsity_delta,
)

__all__ = [
    "ShardState",
    "Op",
    "OP_TABLE",
    "OPS",
    "PER_BLOCK",
    "result_width",
    "max_result_width",
    "run_blocks",
    "Reducer",
    "ExactReducer",
    "AverageReducer",
    "REDUCERS",
    "make_reducer",
    "serial_scatter",
]

Scatter = Callable[[str, np.ndarray], "list[tuple[int, np.ndarray]]"]


class ShardState:
    """What a worker keeps of one block (or shard) between rounds: its patches, in float32 or
    float64, and — between the two rounds of the exact protocol only — the activations of θ."""

    def __init__(self, X: np.ndarray, config: SAEConfig) -> None:
        X = np.asarray(X)
        self.X = np.ascontiguousarray(X, dtype=X.dtype if X.dtype in (np.float32, np.float64) else np.float64)
        self.config = config
        self.theta: np.ndarray | None = None  # θ of the cached activations
        self.A: np.ndarray | None = None  # hidden_exp(θ, X), kept for the backward round
        self.evaluation: int | None = None  # the evaluation θ and A belong to (the worker's tag)

    @property
    def m(self) -> int:
        """Rows in this shard."""
        return self.X.shape[0]


def _op_sums(st: ShardState, theta: np.ndarray) -> np.ndarray:
    return shard_sums(theta, st.X, st.config).vec


def _op_forward(st: ShardState, theta: np.ndarray) -> np.ndarray:
    st.theta, st.A = theta, hidden_exp(theta, st.X, st.config)  # the caller owns θ and keeps it unchanged
    return hidden_sums(st.A, st.config)


def _op_backward(st: ShardState, s: np.ndarray) -> np.ndarray:
    if st.A is None or st.theta is None:
        raise ProtocolError("backward round without a forward round: the worker holds no activations")
    vec = backward(st.theta, st.X, st.A, s, st.config).vec
    st.A = None  # one backward per forward: a stale A must never be reused
    return vec


def _op_average(st: ShardState, theta: np.ndarray) -> np.ndarray:
    cost, grad = cost_and_grad(theta, st.X, st.config)
    return np.concatenate([[cost * st.m], grad * st.m])


@dataclass(frozen=True)
class Op:
    """Everything the master, the coordinator and the workers know of one worker operation.

    A new op is one entry of ``OP_TABLE``: its worker side, the shape of its answer, and how
    it links the rounds of an evaluation — what a worker keeps from it for the next round
    (``keeps``), or which earlier op's kept state it needs (``after``). Workers, agents and
    compute processes read these facts; none of them names an op.
    """

    name: str
    run: Callable[[ShardState, np.ndarray], np.ndarray]  # the worker side, on one block
    per_block: bool  # one row per block, added along the summation tree; else one row per group
    keeps: str | None  # what a worker keeps for the next round: "activations" (and θ), or nothing
    after: str | None  # the op of the round before whose kept state this one uses (computed again
    #                    from that round's θ where a block lacks it: a backup, a respawned process)
    width_of: Callable[[SAEConfig], int]  # length of one result row

    def width(self, config: SAEConfig) -> int:
        """Length of one result row for ``config``'s model."""
        return self.width_of(config)


OP_TABLE: dict[str, Op] = {op.name: op for op in (
    Op("sums", _op_sums, True, None, None, lambda c: Sums.size(c, one_round=True)),  # θ -> one-round Sums.vec
    # θ -> [Σ a2 | Σ (1 − a2)] (2h,); keeps the hidden layer and θ for the backward round
    Op("forward", _op_forward, True, "activations", None, lambda c: 2 * c.n_hidden),
    # s -> Sums.vec (s folded), from the forward round's hidden layer
    Op("backward", _op_backward, True, None, "forward", lambda c: Sums.size(c, one_round=False)),
    Op("average", _op_average, False, None, None, lambda c: c.n_params + 1),  # θ -> [m·J_shard, m·∇J_shard]
)}
# views of the table for the code that needs one fact
OPS: dict[str, Callable[[ShardState, np.ndarray], np.ndarray]] = {k: op.run for k, op in OP_TABLE.items()}
PER_BLOCK = {k for k, op in OP_TABLE.items() if op.per_block}  # exact: rows added along the summation tree


def result_width(op: str, config: SAEConfig) -> int | None:
    """Length of one result row of ``op`` (None: not an op this version knows)."""
    return OP_TABLE[op].width(config) if op in OP_TABLE else None


def max_result_width(config: SAEConfig) -> int:
    """The longest result row of any op: what the master's inbound frame limit must admit."""
    return max(op.width(config) for op in OP_TABLE.values())


@pinned  # once for all the blocks: the per-block passes inside are not checked again
def run_blocks(op: str, arg: np.ndarray, blocks: list[ShardState]) -> np.ndarray:
    """What a worker returns for ``op`` on its listed blocks.

    The exact ops give one result row per block, (len(blocks), L); the worker adds them along
    the summation tree (``qsae.tree.fold``) before sending. "average" treats the blocks as one shard
    with its own firing rates p_j (the report's approximation) and gives (1, L).
    """
    if op not in OPS:
        raise ProtocolError(f"unknown operation {op!r}; known: {', '.join(OPS)}")
    if not blocks:
        raise ProtocolError(f"{op}: no blocks to compute")
    if OP_TABLE[op].keeps:
        arg = np.array(arg)  # one copy of θ kept by every block for the next round
    if op in PER_BLOCK:
        return np.stack([OPS[op](st, arg) for st in blocks])
    if len(blocks) == 1:
        return OPS[op](blocks[0], arg)[None, :]
    return _average_group(arg, blocks)[None, :]


def _average_group(theta: np.ndarray, blocks: list[ShardState]) -> np.ndarray:
    """[m·J, m·∇J] of several blocks taken as one shard: ``cost_and_grad`` of their rows
    without concatenating them."""
    cfg = blocks[0].config
    acts = [hidden_exp(theta, st.X, cfg) for st in blocks]
    m = sum(st.m for st in blocks)
    s = sparsity_delta(sum(hidden_sums(U, cfg) for U in acts) / m, cfg)
    total = _add([(st.m, backward(theta, st.X, A, s, cfg).vec) for st, A in zip(blocks, acts)])
    cost, grad = finish_sums(theta, total, cfg, s_folded=True)
    return np.concatenate([[cost * m], grad * m])


Steps = Generator["tuple[str, np.ndarray]", "list[tuple[int, np.ndarray]]", "tuple[float, np.ndarray]"]


class Reducer(ABC):
    """Turns the workers' replies into the exact or approximate (cost, grad).

    ``steps`` is the protocol as a generator: it yields (op, arg) for every round and is sent
    each round's replies; its return value is (cost, grad). Whoever drives it may stop it
    between rounds (the master does when a worker is lost: it settles and starts again), so
    nothing unwinds through it. ``evaluate`` drives it with a plain ``scatter`` function.
    """

    name: str = ""

    def __init__(self, config: SAEConfig) -> None:
        self.config = config

    @abstractmethod
    def steps(self, theta: np.ndarray) -> Steps:
        """The rounds of one evaluation at θ."""

    def evaluate(self, theta: np.ndarray, scatter: Scatter) -> tuple[float, np.ndarray]:
        """Cost and gradient at θ, computed through ``scatter``."""
        gen = self.steps(theta)
        replies = None
        while True:
            try:
                op, arg = gen.send(replies)  # type: ignore[arg-type]
            except StopIteration as done:
                return done.value
            replies = scatter(op, arg)


class ExactReducer(Reducer):
    """The cost of the whole data set, whatever the split, in one or two rounds."""

    name = "exact"

    def __init__(self, config: SAEConfig, rounds: int | None = None) -> None:
        super().__init__(config)
        if rounds not in (None, 1, 2):
            raise ConfigError(f"rounds={rounds!r}: the exact protocol takes 1 or 2 rounds (None: the default, 1)")
        self.rounds = rounds or 1

    def steps(self, theta: np.ndarray) -> Steps:
        """Cost and gradient at θ, in the run's rounds."""
        cfg = self.config
        if self.rounds == 1:
            total = _add((yield "sums", theta))
            return finish_sums(theta, total, cfg, s_folded=False)
        replies = yield "forward", theta
        m = sum(k for k, _ in replies)
        rates = sum(v for _, v in replies) / m  # [p | 1 − p]
        total = _add((yield "backward", sparsity_delta(rates, cfg)))
        return finish_sums(theta, total, cfg, s_folded=True)


class AverageReducer(Reducer):
    """The report's approximation: each shard's own p_j, results weighted by shard size."""

    name = "average"

    def steps(self, theta: np.ndarray) -> Steps:
        replies = yield "average", theta
        m = sum(k for k, _ in replies)
        v = sum(vec for _, vec in replies) / m
        return float(v[0]), v[1:]


def _add(replies: list[tuple[int, np.ndarray]]) -> Sums:
    total = Sums(0, 0.0)  # type: ignore[arg-type]
    for k, vec in replies:
        total = total + Sums(k, vec)
    return total


REDUCERS: dict[str, type[Reducer]] = {"exact": ExactReducer, "average": AverageReducer}


def make_reducer(name: str, config: SAEConfig, **options) -> Reducer:
    """The reducer called ``name`` ("exact" or "average")."""
    if name not in REDUCERS:
        raise ConfigError(f"unknown protocol {name!r}; choose one of: {', '.join(REDUCERS)}")
    return REDUCERS[name](config, **options)


def serial_scatter(shards: list[ShardState]) -> Scatter:
    """A ``scatter`` that runs every operation in this process, shard after shard.

    The reference the distributed runtime is tested against, and a way to study the
    protocols without sockets.
    """

    def scatter(op: str, arg: np.ndarray) -> list[tuple[int, np.ndarray]]:
        return [(st.m, OPS[op](st, arg)) for st in shards]

    return scatter
