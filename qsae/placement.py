"""Blocks of rows and the pure planner that decides which worker holds which block.

The data set's m rows are cut into fixed blocks (``block_bounds``, sizes of m alone); a block
is the unit a worker holds, the unit that moves, and the unit of a straggler's backup. Block
sums are added along one fixed tree over the block ids (``qsae.tree``), so any placement
gives the same sums, bit for bit; a worker sends one row per tree node its blocks make, so
the planner places ranges of blocks (placed in block order, moved from a range's ends).

``plan`` is a pure function of a snapshot — the workers, their measured speed, the blocks
each holds and the blocks nobody holds — and returns the moves to make. It knows nothing of
sockets; the master carries the moves out (DESIGN.md, "Blocks, balance and membership")::

    moves = plan([WorkerView("a", 2e6, (0, 1, 2)), WorkerView("b", 1e6, ())], sizes)

A round lasts as long as its slowest worker: max over workers of rows held / rows per
second. Blocks nobody holds (the data set's start, a lost or departed worker's blocks) are
always placed. Beyond that, blocks move from the slowest worker to the one that would
finish soonest with it, one at a time, while that shortens the predicted round — and the
whole rebalance is kept only if it is clearly worth it (``HYSTERESIS``) and pays for its
own cost within ``PAYBACK_EVALS`` evaluations. Noise in the speeds therefore never moves
blocks back and forth. A worker that holds nothing (it just joined) is always given its
share: someone added it to be used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Sequence

from . import tree

__all__ = [
    "BLOCK_ROWS",
    "MIN_BLOCK_ROWS",
    "MIN_BLOCKS",
    "MAX_BLOCKS",
    "HYSTERESIS",
    "PAYBACK_EVALS",
    "WorkerView",
    "Move",
    "block_rows_for",
    "block_bounds",
    "round_seconds",
    "plan",
]

# Rows per block, measured (one-round sums of 98,304 rows cut in blocks, against one block, one
# BLAS thread): 256 rows 1.22x, 512 1.09x, 1024 1.03x, 2048 0.94x, 4096 0.84x, 8192 0.81x —
# below 1024 rows the per-block costs (a 47 KB result row, a Python call) show; from 2048 the
# smaller working set even beats one big block. 4096 is also one generator block of the patch
# set (data.BLOCK), cut from the images in one draw.
BLOCK_ROWS = 4096
# Small data sets get smaller blocks, to have enough of them, down to this: each block's result
# row (47 KB, encrypted, sent, added) costs ~60 µs, and with 2 workers at 10K patches blocks of
# 504 rows took 5.2 ms an evaluation, 1008 rows 4.5, 5040 rows 4.0 (but those balance coarsely).
MIN_BLOCK_ROWS = 1024
# At least this many blocks where the rows allow (blocks of MIN_BLOCK_ROWS or more): 2 workers
# split 64 blocks within 1/64 of even, 8 workers within 1/8 of a worker's share. The number of
# blocks depends on m alone, never on the workers: a block is the unit of the summation tree
# (qsae.tree), so the sums' bits are the same for any number of workers.
MIN_BLOCKS = 64
# Above this many, blocks grow (in multiples of BLOCK_ROWS). Workers send one row per aligned
# range of blocks (qsae.tree), not one per block, so this bounds bookkeeping (ids in a message,
# protocol.MAX_IDS), not the bytes a round moves: 10M patches are 2,442 blocks of 4,096 rows.
MAX_BLOCKS = 4096

# A rebalance is made only if the predicted round gets at least this much shorter: speeds
# measured on this shared 2-core machine vary by 10–30% from round to round even as medians of
# five (seen with other jobs running); a slower node worth balancing costs 33% (half speed).
HYSTERESIS = 0.20
# ... and only if the time it saves over this many evaluations exceeds the time it costs
# (cutting or receiving the moved blocks; measured from the workers' READY). Cutting a block
# from the images takes about 3x its one-round compute (11 ms against 3.8 ms for 4096 rows),
# so a third worker joining two saves a sixth of a round per evaluation for a third of the
# data cut: it repays in about 6 evaluations. L-BFGS evaluates 1–2 times per iteration.
PAYBACK_EVALS = 10


@dataclass(frozen=True)
class WorkerView:
    """What the planner knows of one worker."""

    key: Hashable  # the worker's identity (the master uses its ZMQ identity)
    speed: float  # rows per second (measured; declared cores until measured)
    blocks: tuple[int, ...] = ()  # blocks it holds now


@dataclass(frozen=True)
class Move:
    """Give ``block`` to ``dst``; ``src`` holds it now (None: nobody does)."""

    block: int
    src: Hashable | None
    dst: Hashable


def block_rows_for(m: int, *, chunk: int = 1) -> int:
    """Rows per block for a data set of ``m`` rows — of m alone, never of the workers, so that
    the sums' bits do not depend on how many compute them.

    ``BLOCK_ROWS``; fewer (a multiple of 128, not below ``MIN_BLOCK_ROWS``) where that would
    leave fewer than ``MIN_BLOCKS`` blocks; a multiple of it where more than ``MAX_BLOCKS``
    would result. Blocks longer than ``chunk`` (the model's row chunk, ``model.chunk_rows``)
    are a whole number of chunks: a short last chunk in every block cost 3% (4096 rows against
    4032 = 8 × 504, two rounds, one BLAS thread)."""
    if m < 1:
        raise ValueError(f"m={m}: a data set needs at least one row")
    big = BLOCK_ROWS * max(1, -(-m // (BLOCK_ROWS * MAX_BLOCKS)))
    enough = 128 * (m // (128 * MIN_BLOCKS))
    rows = max(MIN_BLOCK_ROWS, min(big, enough))
    return chunk * max(1, round(rows / chunk)) if rows > chunk else rows


def block_bounds(m: int, block_rows: int) -> list[tuple[int, int]]:
    """(lo, hi) rows of every block: all ``block_rows`` long but the last."""
    return [(lo, min(lo + block_rows, m)) for lo in range(0, m, block_rows)]


def round_seconds(workers: Sequence[WorkerView], sizes: Sequence[int]) -> float:
    """Predicted seconds of a round: the slowest worker's rows held / rows per second."""
    return max((sum(sizes[b] for b in w.blocks) / w.speed for w in workers), default=0.0)


def plan(workers: Sequence[WorkerView], sizes: Sequence[int], *, move_seconds: float = 0.0,
         hysteresis: float = HYSTERESIS, payback_evals: int = PAYBACK_EVALS, balance: bool = True) -> list[Move]:
    """The moves that place every block and balance the predicted round.

    Parameters
    ----------
    workers : the workers that may hold blocks, with their speed (> 0, rows/s) and blocks.
        No block may be held by two workers.
    sizes : rows of each block (``sizes[b]`` for block b); blocks held by nobody are placed.
    move_seconds : what moving one block costs (seconds): the price a rebalance must repay
        within ``payback_evals`` evaluations.
    hysteresis : the fraction by which a rebalance must shorten the predicted round.
    balance : False: only place unheld blocks and give joiners their share (the master
        rests a few evaluations after a rebalance, until the speeds have been measured anew).

    Returns
    -------
    Moves: first every unheld block's (``src`` None), then the rebalancing ones (none if
    they are not worth it). Applying them gives each block exactly one holder.
    """
    if not workers:
        raise ValueError("plan: no workers to hold the blocks")
    if any(not w.speed > 0 for w in workers):
        raise ValueError(f"plan: every speed must be > 0 rows/s; got {[w.speed for w in workers]}")
    # set operations and sums in C: the master asks every few evaluations, and a settled
    # cluster's answer must not cost a Python step per block (4,096 blocks: milliseconds)
    taken = set().union(*(w.blocks for w in workers))
    if len(taken) != sum(len(w.blocks) for w in workers) or (taken and not 0 <= min(taken) <= max(taken) < len(sizes)):
        _check_held(workers, len(sizes))
    held = {w.key: list(w.blocks) for w in workers}
    speed = {w.key: w.speed for w in workers}
    rows = {w.key: sum(map(sizes.__getitem__, w.blocks)) for w in workers}

    def finish(k: Hashable, extra: int = 0) -> float:
        return (rows[k] + extra) / speed[k]

    def give(b: int, src: Hashable | None, dst: Hashable) -> Move:
        if src is not None:
            held[src].remove(b)
            rows[src] -= sizes[b]
        held[dst].append(b)
        rows[dst] += sizes[b]
        return Move(b, src, dst)

    # 1. every block must have a holder: in block order, each to the holder of the block before
    #    it while that one stays within its fair share, else to whoever finishes it soonest — so
    #    placed blocks form ranges (a few tree nodes, a few result rows, a worker)
    fair = sum(sizes) / sum(speed.values())  # seconds of a perfectly balanced round
    placed: list[Move] = []
    unheld = sorted(set(range(len(sizes))) - taken) if len(taken) < len(sizes) else []
    owner: dict[int, Hashable] = {b: w.key for w in workers for b in w.blocks} if unheld else {}
    for b in unheld:
        k = owner.get(b - 1)
        if k is None or finish(k, sizes[b]) > fair + 0.5 * sizes[b] / speed[k]:
            k = min(speed, key=lambda k: (finish(k, sizes[b]), str(k)))
        placed.append(give(b, None, k))
        owner[b] = k

    # 2. balance: the slowest worker gives one block at a time while that shortens the round,
    #    an end of one of its ranges, the one that leaves both sides the fewest tree nodes.
    #    No round is shorter than a perfectly balanced one (``fair``): where even that would
    #    not clear the hysteresis, no rebalance can, and the search is skipped (the master
    #    asks every few evaluations; a balanced cluster's answer then costs microseconds)
    before = max(finish(k) for k in speed)
    joined = any(not w.blocks and not any(mv.dst == w.key for mv in placed) for w in workers)
    if not joined and (not balance or before - fair <= hysteresis * before):
        return placed
    moves: list[Move] = []
    for _ in range(len(sizes) * len(speed)):  # bounded: each move strictly lowers the maximum
        slow = max(speed, key=lambda k: (finish(k), str(k)))
        if not held[slow]:
            break
        step = min(sizes[b] for b in held[slow])
        dst = min((k for k in speed if k != slow), key=lambda k: (finish(k, step), str(k)), default=None)
        if dst is None:
            break
        b = _edge_block(held[slow], held[dst], sizes)
        if finish(dst, sizes[b]) >= finish(slow):
            break
        moves.append(give(b, slow, dst))
    after = max(finish(k) for k in speed)
    saved = before - after
    if not moves or (not joined and (not balance or saved <= hysteresis * before
                                     or saved * payback_evals <= move_seconds * len(_net(moves)))):
        return placed
    return placed + _net(moves)


def _check_held(workers: Sequence[WorkerView], n_blocks: int) -> None:
    """Raise ValueError naming a block held twice or one the data set does not have."""
    seen: set[int] = set()
    for w in workers:
        for b in w.blocks:
            if b in seen or not 0 <= b < n_blocks:
                raise ValueError(f"plan: block {b} is held twice or does not exist ({n_blocks} blocks)")
            seen.add(b)


def _edge_block(src: list[int], dst: list[int], sizes: Sequence[int]) -> int:
    """The block ``src`` should give ``dst``: an end of one of src's ranges (never one that
    splits a range), the one after which the two hold the fewest tree nodes; then the smallest,
    then the lowest id. (Only the ranges a move touches change their node counts: each end is
    priced from those, in O(log B), not by covering both sets again.)"""
    B = len(sizes)
    theirs = tree.runs(sorted(dst))
    ending = {hi: lo for lo, hi in theirs}  # dst's range that a block b would extend: ending at b ...
    starting = {lo: hi for lo, hi in theirs}  # ... or starting at b + 1

    def gained(b: int) -> int:  # how many more nodes dst holds with b
        lo, hi = ending.get(b, b), starting.get(b + 1, b + 1)
        before = (tree.count(lo, b, B) if lo < b else 0) + (tree.count(b + 1, hi, B) if hi > b + 1 else 0)
        return tree.count(lo, hi, B) - before

    priced = []
    for lo, hi in tree.runs(sorted(src)):
        whole = tree.count(lo, hi, B)
        for b, rest in ((lo, (lo + 1, hi)), (hi - 1, (lo, hi - 1))):
            left = tree.count(*rest, B) if rest[0] < rest[1] else 0
            priced.append((left - whole + gained(b), sizes[b], b))
    return min(priced)[2]


def _net(moves: list[Move]) -> list[Move]:
    """One move per block, from its first holder to its last (a block moved twice goes once)."""
    first: dict[int, Move] = {}
    for mv in moves:
        first[mv.block] = Move(mv.block, first[mv.block].src if mv.block in first else mv.src, mv.dst)
    return [mv for mv in first.values() if mv.src != mv.dst]
