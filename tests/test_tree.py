"""The fixed summation tree, without sockets: any holding of the leaves gives the full tree's bits."""

from __future__ import annotations

import numpy as np
import pytest

from qsae.errors import ProtocolError
from qsae import tree
from qsae.tree import check_cover, code, cover, decode, depth, fold, root, span, value
from qsae.tree import decode as decode_node

pytestmark = pytest.mark.timeout(60)


def full_sum(rows: np.ndarray) -> np.ndarray:
    """The tree's sum written out independently: pairwise by levels, left + right, an odd last
    node carried up unchanged."""
    level = list(rows)
    while len(level) > 1:
        level = [level[i] + level[i + 1] if i + 1 < len(level) else level[i] for i in range(0, len(level), 2)]
    return level[0]


def random_holdings(rng: np.random.Generator, B: int, aligned: bool) -> list[list[int]]:
    """A partition of 0..B−1: contiguous ranges cut anywhere, or scattered blocks."""
    if aligned:
        cuts = sorted(set(rng.integers(1, B, size=int(rng.integers(0, 6))).tolist())) if B > 1 else []
        return [list(range(a, b)) for a, b in zip([0, *cuts], [*cuts, B])]
    owner = rng.integers(0, int(rng.integers(1, 6)), size=B)
    return [np.flatnonzero(owner == k).tolist() for k in np.unique(owner)]


@pytest.mark.parametrize("B", [1, 2, 3, 5, 8, 13, 64, 100, 257])
@pytest.mark.parametrize("aligned", [True, False])
def test_any_holding_gives_the_full_trees_bits(B, aligned):
    rng = np.random.default_rng(B)
    rows = rng.standard_normal((B, 7)).astype(np.float32).astype(np.float64) * 10.0 ** rng.integers(-8, 8, (B, 1))
    want = full_sum(rows)
    for _ in range(20):
        known = {}
        for ids in random_holdings(rng, B, aligned):
            ids = rng.permutation(ids).tolist()  # a reply lists its blocks in any order
            nodes, vals = fold(ids, rows[ids], B)
            check_cover(nodes, ids, B)
            known.update(zip(nodes, vals))
        np.testing.assert_array_equal(value(root(B), known, B), want)


def test_a_backup_overlapping_a_holders_node_changes_no_bit():
    rng = np.random.default_rng(0)
    B = 16
    rows = rng.standard_normal((B, 5)) * 1e3
    known = dict(zip(*fold(list(range(8)), rows[:8], B)))  # a holder's one node for 0..7
    known.update(zip(*fold([2, 3, 4], rows[2:5], B)))  # a backup's nodes inside it
    known.update(zip(*fold(list(range(8, 16)), rows[8:], B)))
    np.testing.assert_array_equal(value(root(B), known, B), full_sum(rows))


def test_cover_makes_the_fewest_aligned_nodes():
    assert cover(range(64), 64) == [(6, 0)]
    assert cover(range(32, 64), 64) == [(5, 1)]  # an aligned range: one row
    assert cover([4], 5) == [(2, 1)]  # the highest node over the last block (its right child is past B)
    assert cover(range(1, 8), 8) == [(0, 1), (1, 1), (2, 1)]
    assert len(cover(range(21, 42), 64)) <= 2 * 6  # any range: about 2·log2(B) nodes at most
    for B in (1, 7, 64, 100):
        for node in cover(range(B), B):
            assert span(node, B) == (0, B)
    assert depth(1) == 0 and depth(2) == 1 and depth(64) == 6 and depth(65) == 7
    with pytest.raises(ValueError):
        cover([5], 5)


def test_a_missing_block_is_named():
    rows = np.ones((4, 2))
    known = dict(zip(*fold([0, 1, 3], rows[[0, 1, 3]], 4)))
    with pytest.raises(KeyError, match="block 2"):
        value(root(4), known, 4)


def test_wire_codes_round_trip_and_bad_ones_are_refused():
    B = 100
    for node in cover(range(3, 97), B):
        assert decode(code(node), B) == node
    for bad in (code((0, 100)), (3 << 5) | 1, code((8, 0))):  # past B, unaligned, above the root
        with pytest.raises(ProtocolError, match="not a node"):
            decode(bad, B)
    with pytest.raises(ProtocolError, match="tree nodes"):
        check_cover([(0, 0), (0, 1)], [0, 1], 4)  # two leaves where one node covers them


def test_a_worker_with_scattered_blocks_answers_along_the_tree_in_several_results():
    """A real worker process holding every other block of 260 (130 blocks, 130 tree nodes:
    none can be merged) answers one EVAL in RESULTs of at most MAX_RESULT_ROWS rows, each
    naming the nodes its blocks make, the rows bit-equal to the per-block sums folded here."""
    import subprocess
    import sys

    import zmq

    from qsae.model import SAEConfig, init_params, shard_sums
    from qsae.protocol import BLOCKS, EVAL, HELLO, MAX_ARRAYS, MAX_RESULT_ROWS, READY, RESULT, SOURCE, STOP, decode
    from qsae.protocol import encode, send

    cfg, B, rows = SAEConfig(), 260, 3
    X = np.random.default_rng(0).uniform(0.1, 0.9, (B * rows - 1, cfg.n_visible))  # a short last block
    theta = init_params(cfg, seed=1)
    ids = list(range(0, B, 2))
    ctx = zmq.Context()
    master = ctx.socket(zmq.ROUTER)
    master.linger = 0
    port = master.bind_to_random_port("tcp://127.0.0.1")
    p = subprocess.Popen([sys.executable, "-m", "qsae.worker", "--connect", f"tcp://127.0.0.1:{port}",
                          "--master-timeout", "20"], stderr=subprocess.DEVNULL)

    def receive(want):
        while True:
            assert master.poll(20_000), f"no {want} from the worker"
            frames = master.recv_multipart()
            msg = decode(frames[1:])
            if msg.type == want:
                return frames[0], msg

    try:
        ident, hello = receive(HELLO)
        assert hello["pid"] == p.pid
        send(master, encode(SOURCE, 1, [], config=cfg.to_dict(), kind="array", m=X.shape[0], block_rows=rows,
                            patch_size=0, seed=0, sigma=0.0, dtype="float64"), (ident,))
        receive(READY)
        for i in range(0, len(ids), MAX_ARRAYS):
            part = ids[i:i + MAX_ARRAYS]
            send(master, encode(BLOCKS, 2 + i, [X[b * rows:(b + 1) * rows] for b in part], ids=part), (ident,))
            receive(READY)
        send(master, encode(EVAL, 9, [theta], op="sums", spans=tree.flat(tree.runs(ids)), evaluation=1), (ident,))
        got, covered, messages = {}, [], 0
        while len(covered) < len(ids):
            _, msg = receive(RESULT)
            messages += 1
            assert msg.round == 9 and len(msg["nodes"]) <= MAX_RESULT_ROWS
            nodes = [decode_node(c, B) for c in msg["nodes"]]
            spans = tree.pairs(msg["spans"])
            check_cover(nodes, tree.blocks_of(spans), B)
            assert tree.node_runs(nodes, B) == spans  # the ranges its nodes make, each in one RESULT
            got.update(zip(nodes, msg.arrays[0]))
            covered += tree.blocks_of(spans)
        assert sorted(covered) == ids and len(got) == len(ids) and messages == 3  # 130 rows: 64 + 64 + 2
        per_block = np.stack([shard_sums(theta, X[b * rows:(b + 1) * rows], cfg).vec for b in ids])
        want_nodes, want = fold(ids, per_block, B)
        for n, row in zip(want_nodes, want):
            np.testing.assert_array_equal(got[n], row)
        send(master, encode(STOP), (ident,))
        assert p.wait(20) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        master.close()
        ctx.term()
