"""The wire format: every message type round-trips; every malformed message is refused."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from qsae.errors import ProtocolError
from qsae.protocol import (
    BLOCKS, BYE, DROP, ERROR, EVAL, HELLO, MAX_ARRAY_BYTES, MAX_IDS, PING, PONG, READY, RESULT, SCHEMA, SOURCE, STOP,
    VERSION, decode, encode,
)

pytestmark = pytest.mark.timeout(30)

GOOD = {
    HELLO: dict(name="w#0", host="h", pid=1, cores=2, version="0.1.0", blas="openblas 0.3.27 Haswell"),
    SOURCE: dict(config={"n_hidden": 30}, kind="images", m=10, block_rows=4, patch_size=8, seed=0, sigma=0.5,
                 dtype="float32"),
    BLOCKS: dict(ids=[0, 2]),
    READY: dict(ids=[0, 2], seconds=0.01),
    DROP: dict(ids=[1]),
    EVAL: dict(op="sums", spans=[0, 1, 2, 3], evaluation=3),
    RESULT: dict(spans=[0, 1, 2, 3], nodes=[0, 64], rows=10, seconds=0.5),
    PING: dict(busy=True),
    PONG: {},
    BYE: {},
    ERROR: dict(etype="ValueError", message="m", traceback="tb", host="h"),
    STOP: {},
}
ARRAYS = {EVAL: [np.arange(5.0)], RESULT: [np.arange(14.0).reshape(2, 7)],
          SOURCE: [np.ones((3, 4)), np.zeros((2, 2))], BLOCKS: [np.ones((4, 3), np.float32), np.ones((4, 3), np.float32)]}


def frames(t, round=3, arrays=None, **fields):
    return [bytes(f) for f in encode(t, round, ARRAYS.get(t, []) if arrays is None else arrays,
                                     **(GOOD[t] if not fields else fields))]


@pytest.mark.parametrize("t", list(SCHEMA))
def test_every_type_round_trips(t):
    msg = decode(frames(t))
    assert msg.type == t and msg.round == 3 and msg.fields == GOOD[t]
    for a, b in zip(msg.arrays, ARRAYS.get(t, [])):
        assert a.dtype == b.dtype and np.array_equal(a, b)


def header(**h):
    base = {"t": EVAL, "v": VERSION, "r": 1, "a": [["<f8", [2]]], "op": "sums", "spans": [0, 1], "evaluation": 1}
    base.update(h)
    return msgpack.packb({k: v for k, v in base.items() if v is not ...})


DATA = np.zeros(2).tobytes()


@pytest.mark.parametrize("msg, words", [
    ([], "empty"),
    ([b"\xc1\xc1"], "not valid msgpack"),
    ([msgpack.packb([1, 2])], "not a map"),
    ([header(t="NOPE"), DATA], "unknown message type"),
    ([header(v=99), DATA], "protocol version 99"),
    ([header(r=-1), DATA], "round -1"),
    ([header(r="1"), DATA], "round '1'"),
    ([header(op=5), DATA], "field 'op' is int"),
    ([header(op=...), DATA], "missing fields ['op']"),
    ([header(extra=1), DATA], "unexpected fields ['extra']"),
    ([header()], "declares 1 arrays but 0"),
    ([header(), DATA, DATA], "declares 1 arrays but 2"),
    ([header(a=[["|O", [2]]]), DATA], "dtype '|O' not allowed"),
    ([header(a=[["<i8", [2]]]), DATA], "dtype '<i8' not allowed"),
    ([header(a=[["<f8", [3]]]), DATA], "needs 24 bytes, the frame has 16"),
    ([header(a=[["<f8", [-2]]]), DATA], "shape [-2]"),
    ([header(a=[["<f8", [2**39, 2**39]]]), b""], "limit"),  # 2^78 elements must not wrap to 0 bytes
    ([header(a=[["<f8", [MAX_ARRAY_BYTES]]]), DATA], "limit"),
    ([header(a=[]),], "must hold 1..1"),
    ([header(a="x"), DATA], "array list"),
    ([msgpack.packb({"t": HELLO, "v": VERSION, "r": 0, "a": [], "name": "n", "host": "h", "pid": True,
                     "cores": 1, "version": "0.1.0", "blas": ""})], "field 'pid' is bool"),
    ([b"\x81" + b"\xa1t" + b"\xdb" + b"\xff\xff\xff\x7f"], "not valid msgpack"),  # a 2 GB string claimed
    ([b"x" * (65 * 1024)], "header of"),
])
def test_malformed_messages_are_refused(msg, words):
    with pytest.raises(ProtocolError) as e:
        decode(msg)
    assert words in str(e.value)


def test_random_bytes_never_escape_as_another_exception():
    rng = np.random.default_rng(0)
    good = frames(EVAL)
    for i in range(3000):
        fs = [bytearray(f) for f in good]
        k = rng.integers(len(fs))
        for _ in range(rng.integers(1, 5)):  # flip bytes in one frame
            if fs[k]:
                fs[k][rng.integers(len(fs[k]))] = rng.integers(256)
        if i % 3 == 0:
            fs = [bytes(rng.integers(0, 256, rng.integers(0, 40), dtype=np.uint8))] + fs[1:]
        try:
            decode([bytes(f) for f in fs])
        except ProtocolError:
            pass


@pytest.mark.parametrize("ids", [[-1], [2**31], [1.5], ["0"], [True], [3, 3], list(range(MAX_IDS + 1))])
def test_bad_block_ids_are_refused(ids):
    decode([header(t=DROP, a=[], op=..., spans=..., evaluation=..., ids=[0, 5])])  # the good form
    with pytest.raises(ProtocolError, match="block id|at most|twice|max_array_len"):
        decode([header(t=DROP, a=[], op=..., spans=..., evaluation=..., ids=ids)])


@pytest.mark.parametrize("spans", [[0], [-1, 2], [0, 2**31], [0.0, 1], [True, 2], [2, 2], [3, 1], [0, 2, 2, 4],
                                   [0, 2, 1, 4], ["0", "1"]])
def test_bad_block_ranges_are_refused(spans):
    """EVAL and RESULT name blocks as ranges [lo, hi): pairs, integers, in order, none empty,
    none adjacent to the next (a holder's maximal ranges)."""
    decode([header(spans=[0, 2, 3, 4]), DATA])  # the good form
    with pytest.raises(ProtocolError, match="ranges|pairs"):
        decode([header(spans=spans), DATA])
