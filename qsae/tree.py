"""The fixed summation tree over block ids: the one order in which block results are added.

Blocks 0..B−1 are the leaves of one binary tree whose shape depends on B alone. Node
(level, i) covers blocks [i·2^level, min((i+1)·2^level, B)); its value is

    value(left) + value(right)      left first, always
    value(left)                     where the right child covers no block (past B)

and the root is (depth(B), 0). Whoever holds every leaf of a node may compute its value and
send it as one row; whoever has rows for nodes that together cover every leaf (any mix of
levels; overlaps allowed) computes the root by the same recursion, stopping at the nodes it
has. A node's value is the same float64 sum whoever computes it, so the root's bits do not
depend on the placement, on the backups, or on how holders are grouped (a worker, later an
agent for a host's processes, each adds along the same tree)::

    nodes = cover(ids, B)                        # the aligned nodes a set of blocks makes
    rows = [value(n, leaves, B) for n in nodes]  # what a holder sends: a row per node
    total = value(root(B), known, B)             # what the master adds: the whole sum

A contiguous range of blocks makes at most about 2·log2(B) nodes, an aligned one
(buddy allocation's: 2^k blocks from a multiple of 2^k) exactly one; the planner
(``qsae.placement``) places ranges, so a worker sends about one row a round.

On the wire a node is one int, ``first block · 32 + level`` (``code``/``decode``).
Pure functions of ids and numpy arrays; nothing here knows of sockets.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np

from .errors import ProtocolError

__all__ = ["Node", "depth", "root", "span", "cover", "runs", "cover_runs", "count", "flat", "pairs", "blocks_of",
           "node_runs", "value", "fold", "code", "decode", "check_cover"]

Node = tuple[int, int]  # (level, index): blocks [index·2^level, (index+1)·2^level) ∩ [0, B)
LEVEL_BITS = 5  # levels 0..31 in a node's wire code: 2^31 blocks, far past placement.MAX_BLOCKS


def depth(B: int) -> int:
    """Level of the root of the tree over B ≥ 1 blocks."""
    if B < 1:
        raise ValueError(f"B={B}: a tree needs at least one block")
    return (B - 1).bit_length()


def root(B: int) -> Node:
    """The node whose value is the sum over every block."""
    return (depth(B), 0)


def span(node: Node, B: int) -> tuple[int, int]:
    """(lo, hi): the blocks ``node`` covers."""
    level, i = node
    lo = i << level
    return lo, min(lo + (1 << level), B)


def cover(blocks: Iterable[int], B: int) -> list[Node]:
    """The fewest nodes that cover exactly ``blocks`` (distinct ids in 0..B−1), in block order.

    Each is the highest node over its blocks: a node whose right child is past B covers the
    same blocks as its left child and is preferred, so a holder and the master agree on it.
    """
    ids = sorted(set(blocks))
    if ids and not 0 <= ids[0] <= ids[-1] < B:
        raise ValueError(f"blocks {ids[0]}..{ids[-1]} are not all in 0..{B - 1}")
    return cover_runs(runs(ids), B)


def runs(ids: Iterable[int]) -> list[tuple[int, int]]:
    """The maximal ranges [lo, hi) of consecutive ids in sorted, distinct ``ids``."""
    out: list[tuple[int, int]] = []
    for b in ids:
        if out and out[-1][1] == b:
            out[-1] = (out[-1][0], b + 1)
        else:
            out.append((b, b + 1))
    return out


def flat(spans: Iterable[tuple[int, int]]) -> list[int]:
    """Ranges on the wire: [lo0, hi0, lo1, hi1, ...] (``protocol`` checks them increasing)."""
    return [x for span in spans for x in span]


def pairs(wire: list[int]) -> list[tuple[int, int]]:
    """The ranges of a wire list (``flat``'s inverse)."""
    return list(zip(wire[::2], wire[1::2]))


def blocks_of(spans: Iterable[tuple[int, int]]) -> list[int]:
    """Every block id in ``spans``, in order."""
    return [b for lo, hi in spans for b in range(lo, hi)]


def node_runs(nodes: list[Node], B: int) -> list[tuple[int, int]]:
    """The maximal ranges of blocks ``nodes`` cover, in order. ProtocolError unless each node
    starts past the one before (what a holder sends: its cover, in block order)."""
    out: list[tuple[int, int]] = []
    for node in nodes:
        lo, hi = span(node, B)
        if out and lo < out[-1][1]:
            raise ProtocolError(f"tree nodes out of block order or overlapping at block {lo}")
        if out and out[-1][1] == lo:
            out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out


def cover_runs(spans: Iterable[tuple[int, int]], B: int) -> list[Node]:
    """``cover`` of the blocks in ``spans`` (maximal ranges, in order), in O(ranges · log B)."""
    return [node for lo, hi in spans for node in _range_nodes(lo, hi, B)]


def count(lo: int, hi: int, B: int) -> int:
    """How many nodes cover the blocks [lo, hi): ``len(cover(range(lo, hi), B))`` in O(log B)."""
    return sum(1 for _ in _range_nodes(lo, hi, B))


def _range_nodes(a: int, b: int, B: int):
    """The nodes of one range [a, b) of blocks, highest first where they may be, in order."""
    top = depth(B)
    while a < b:
        level = 0
        while level < top and a % (2 << level) == 0 and min(a + (2 << level), B) <= b:
            level += 1
        yield (level, a >> level)
        a = min(a + (1 << level), B)


def value(node: Node, known: Mapping[Node, np.ndarray], B: int) -> np.ndarray:
    """The node's value from ``known`` rows (leaves are (0, b)): the known row where there is
    one, else value(left) + value(right) (value(left) where the right child is past B).

    Raises KeyError naming a block no known node covers.
    """
    row = known.get(node)
    if row is not None:
        return row
    level, i = node
    if level == 0:
        raise KeyError(f"block {i} is covered by none of the rows")
    left, right = (level - 1, 2 * i), (level - 1, 2 * i + 1)
    if right[1] << right[0] >= B:
        return value(left, known, B)
    return value(left, known, B) + value(right, known, B)


def fold(ids: list[int], rows: np.ndarray, B: int) -> tuple[list[Node], np.ndarray]:
    """A holder's reply: the nodes its blocks ``ids`` make and each node's value from the
    per-block ``rows`` (len(ids), L) — one row per node instead of one per block."""
    leaves = {(0, b): r for b, r in zip(ids, rows)}
    nodes = cover(ids, B)
    return nodes, np.stack([value(n, leaves, B) for n in nodes])


def code(node: Node) -> int:
    """A node's wire form: its first block · 32 + its level."""
    level, i = node
    return ((i << level) << LEVEL_BITS) | level


def decode(c: int, B: int) -> Node:
    """The node of a wire code; ProtocolError if it is no node of the tree over B blocks."""
    level, lo = c & ((1 << LEVEL_BITS) - 1), c >> LEVEL_BITS
    if level > depth(B) or lo >= B or lo % (1 << level):
        raise ProtocolError(f"node code {c} (block {lo}, level {level}) is not a node of the tree over {B} blocks")
    return (level, lo >> level)


def check_cover(nodes: list[Node], ids: list[int], B: int) -> None:
    """ProtocolError unless ``nodes`` are ``cover(ids, B)``: what a holder of ``ids`` must send."""
    want = cover(ids, B)
    if nodes != want:
        raise ProtocolError(f"a reply for blocks {_span_text(ids)} sent {len(nodes)} tree nodes, not the "
                            f"{len(want)} those blocks make")


def _span_text(ids: list[int]) -> str:
    return f"{min(ids)}..{max(ids)} ({len(ids)})" if ids else "none"
