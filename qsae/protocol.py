"""The wire protocol between master and workers: message types, framing, validation.

A message is one msgpack header frame followed by one raw frame per array::

    header = {"t": TYPE, "v": VERSION, "r": ROUND, "a": [[dtype, shape], ...], ...fields}
    frames = [msgpack(header), array_0 bytes, array_1 bytes, ...]

Nothing is ever unpickled: arrays are rebuilt with ``np.frombuffer`` from their declared
dtype and shape, after checking that the frame holds exactly that many bytes. Every header
field is checked against the schema of its message type before anyone uses it.

Message types (direction, fields, arrays):

    HELLO   w→m  name, host, pid, cores, version, blas         —
                 (its BLAS library, version and kernel);
                 optional: procs (a host agent's compute
                 processes; absent: one process, a plain worker)
    SOURCE  m→w  config, kind ("images" | "array"), m,         the images (kind "images")
                 block_rows, patch_size, seed, sigma, dtype
    BLOCKS  m→w  ids (blocks to hold from now on)              one array of rows per id
                                                               (kind "array"; none for images:
                                                               the worker cuts them)
    READY   w→m  ids (blocks now held), seconds (to get them)  —
    DROP    m→w  ids (blocks to forget)                        —
    EVAL    m→w  op (a key of reduce.OPS), spans (blocks:     the argument vector
                 [lo0, hi0, lo1, hi1, ...], ranges [lo, hi)
                 in order, none adjacent), evaluation (whose
                 θ: forward and backward rounds share it)
    RESULT  w→m  spans, nodes (tree.code of each row's node),  (len(nodes), L): a row per node
                 rows, seconds (compute)                       of the summation tree (qsae.tree)
                                                               that spans make ((1, L) and no
                                                               nodes for "average")
    PING    both busy                                          —
    PONG    both —                                             —
    BYE     w→m  — (the worker is leaving: SIGTERM, Ctrl-C)    —
    ERROR   both etype, message, traceback, host               —
    STOP    m→w  —                                             —

Rows of the data set are placed in blocks (``qsae.placement``): a worker holds a set of
block ids and every EVAL names the blocks to compute (as ranges: a round's headers and
the master's work grow with a worker's ranges, not its blocks), so a block can move or be computed
by a second worker (a straggler's backup) without changing what the master adds up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import msgpack
import numpy as np
import zmq

from .errors import ProtocolError

__all__ = [
    "VERSION",
    "HELLO", "SOURCE", "BLOCKS", "READY", "DROP", "EVAL", "RESULT", "PING", "PONG", "BYE", "ERROR", "STOP",
    "Message",
    "encode",
    "decode",
    "send",
    "MAX_HEADER_BYTES",
    "MAX_ARRAY_BYTES",
    "MAX_RESULT_ROWS",
]

VERSION = 4  # 2: blocks (SOURCE, BLOCKS, DROP, BYE) replaced SHARD's row ranges; 3: EVAL names its evaluation,
#              RESULT carries rows of the summation tree's nodes, HELLO the worker's BLAS; 4: EVAL and
#              RESULT name ranges of blocks (spans), not every block
HELLO, SOURCE, BLOCKS, READY, DROP, EVAL, RESULT, PING, PONG, BYE, ERROR, STOP = (
    "HELLO", "SOURCE", "BLOCKS", "READY", "DROP", "EVAL", "RESULT", "PING", "PONG", "BYE", "ERROR", "STOP",
)
MAX_HEADER_BYTES = 64 * 1024  # a header is a few hundred bytes; anything larger is garbage
MAX_ARRAY_BYTES = 64 * 1024 * 1024  # one image or one chunk of rows; the master chunks below this
MAX_ARRAYS = 64  # images in one SOURCE message, blocks of rows in one BLOCKS message
MAX_IDS = 4096  # block ids in one message: every block of a run (placement.MAX_BLOCKS)
# Result rows in one RESULT (one per tree node): a contiguous range of blocks makes at most
# ~2·log2(blocks) = 24 nodes; a worker with more (scattered blocks) sends several RESULTs. The
# master's ZMQ_MAXMSGSIZE allows this many rows (64 one-round rows of h = 30 are 3 MB).
MAX_RESULT_ROWS = 64
MAX_STR = 16 * 1024  # tracebacks included
ALLOWED_DTYPES = {"<f8": np.dtype("<f8"), "<f4": np.dtype("<f4")}

# Per type: required header fields and their exact types (bool is not an int here). Extra
# fields are an error too.
# ``_IDS`` is a list of distinct block ids (ints in 0..2^31), checked element by element.
# ``_SPANS`` is a flat list of ranges [lo0, hi0, lo1, hi1, ...], strictly increasing (ranges in
# order, none empty, none adjacent to the next: a holder's maximal ranges).
_STR, _INT, _NUM, _BOOL, _DICT, _IDS, _SPANS = (str,), (int,), (int, float), (bool,), (dict,), (list,), tuple([list])
SCHEMA: dict[str, dict[str, tuple]] = {
    HELLO: {"name": _STR, "host": _STR, "pid": _INT, "cores": _INT, "version": _STR, "blas": _STR},
    SOURCE: {"config": _DICT, "kind": _STR, "m": _INT, "block_rows": _INT, "patch_size": _INT, "seed": _INT,
             "sigma": _NUM, "dtype": _STR},
    BLOCKS: {"ids": _IDS},
    READY: {"ids": _IDS, "seconds": _NUM},
    DROP: {"ids": _IDS},
    EVAL: {"op": _STR, "spans": _SPANS, "evaluation": _INT},
    RESULT: {"spans": _SPANS, "nodes": _IDS, "rows": _INT, "seconds": _NUM},
    PING: {"busy": _BOOL},
    PONG: {},
    BYE: {},
    ERROR: {"etype": _STR, "message": _STR, "traceback": _STR, "host": _STR},
    STOP: {},
}
# Per type: fields a sender may leave out (older senders do), with their exact types. An agent
# (``qsae.agent``) says how many compute processes it runs; a plain worker says nothing.
OPTIONAL: dict[str, dict[str, tuple]] = {HELLO: {"procs": _INT}}
ARRAY_COUNT = {EVAL: (1, 1), RESULT: (1, 1), SOURCE: (0, MAX_ARRAYS), BLOCKS: (0, MAX_ARRAYS)}  # (min, max)


@dataclass
class Message:
    """A decoded, validated message."""

    type: str
    round: int = 0
    fields: dict = field(default_factory=dict)
    arrays: list = field(default_factory=list)

    def __getitem__(self, key: str) -> Any:
        return self.fields[key]


def encode(type: str, round: int = 0, arrays: Sequence[np.ndarray] = (), **fields: Any) -> list:
    """Frames of a message: the msgpack header, then each array (C-contiguous, not copied)."""
    arrays = [np.ascontiguousarray(a) for a in arrays]
    header = {"t": type, "v": VERSION, "r": round, "a": [[a.dtype.str, list(a.shape)] for a in arrays], **fields}
    return [msgpack.packb(header, use_bin_type=True), *arrays]


def send(sock: Any, frames: Sequence[Any], prefix: Sequence[bytes] = ()) -> None:
    """Send ``encode``'s frames (after ``prefix``, e.g. a ROUTER's identity frame).

    One ``send`` per frame: pyzmq's ``send_multipart`` adds ~6 µs of Python per message,
    a tenth of a tiny round. ``copy=False`` lets pyzmq choose: frames under
    ``zmq.COPY_THRESHOLD`` (64 KB) are copied, which is cheaper than its zero-copy
    bookkeeping; larger ones are shared with libzmq, which holds a reference until sent —
    so the caller must not write into an array it sent before the reply to it arrives.
    """
    parts = [*prefix, *frames]
    last = len(parts) - 1
    for i, f in enumerate(parts):
        sock.send(f, zmq.SNDMORE if i < last else 0, copy=False)


def _buffer(frame: Any) -> memoryview:
    return frame.buffer if hasattr(frame, "buffer") else memoryview(frame)


_UNPACK = dict(raw=False, strict_map_key=True, max_str_len=MAX_STR, max_bin_len=0, max_array_len=MAX_IDS,
               max_map_len=64, max_ext_len=0)  # limits checked while parsing, before anything is allocated
_MISSING = object()


def decode(frames: Sequence[Any]) -> Message:
    """Validate and decode frames (bytes or zmq.Frame); raise ProtocolError on any fault."""
    if not frames:
        raise ProtocolError("empty message: no header frame")
    head = _buffer(frames[0])
    if head.nbytes > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {head.nbytes} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        h = msgpack.unpackb(head, **_UNPACK)
    except Exception as e:
        raise ProtocolError(f"header is not valid msgpack: {type(e).__name__}: {e}") from None
    if type(h) is not dict:
        raise ProtocolError(f"header is a {type(h).__name__}, not a map")
    t, v, r, specs = h.pop("t", None), h.pop("v", None), h.pop("r", None), h.pop("a", None)
    schema = SCHEMA.get(t) if type(t) is str else None  # type first: a list key would raise TypeError
    if schema is None:
        raise ProtocolError(f"unknown message type {t!r:.40}; known: {', '.join(SCHEMA)}")
    if v != VERSION:
        raise ProtocolError(f"protocol version {v!r:.20}, this side speaks {VERSION}: "
                            "install the same qsae version on both")
    if type(r) is not int or r < 0:
        raise ProtocolError(f"{t}: round {r!r:.40} is not a non-negative integer")
    _check_fields(t, schema, h, OPTIONAL.get(t))
    arrays = _arrays(t, specs, frames[1:])
    return Message(t, r, h, arrays)


def _check_fields(t: str, schema: dict[str, tuple], h: dict, optional: dict[str, tuple] | None = None) -> None:
    if not optional:  # most types, RESULT and PING among them: no dict built per message
        _check_required(t, schema, h)
        return
    extra = {k: h.pop(k) for k in optional if k in h}  # checked apart: the required ones must match exactly
    try:
        _check_required(t, schema, h)
        for k, val in extra.items():
            if type(val) not in optional[k] or (type(val) is int and not -(2**62) < val < 2**62):
                want = " or ".join(x.__name__ for x in optional[k])
                raise ProtocolError(f"{t}: optional field {k!r} is {type(val).__name__} {val!r:.40}, expected {want}")
    finally:
        h.update(extra)


def _check_required(t: str, schema: dict[str, tuple], h: dict) -> None:
    for k, types in schema.items():
        val = h.get(k, _MISSING)
        if type(val) not in types:
            if val is _MISSING or len(h) != len(schema):
                missing, extra = set(schema) - set(h), set(h) - set(schema)
                raise ProtocolError(f"{t}: missing fields {sorted(missing)}, unexpected fields {sorted(extra)}")
            want = " or ".join(x.__name__ for x in types)
            raise ProtocolError(f"{t}: field {k!r} is {type(val).__name__}, expected {want}")
        if type(val) is int and not -(2**62) < val < 2**62:
            raise ProtocolError(f"{t}: field {k!r} = {val} is out of range")
        if types is _IDS:
            _check_ids(t, k, val)
        elif types is _SPANS:
            _check_spans(t, k, val)
    if len(h) != len(schema):
        raise ProtocolError(f"{t}: unexpected fields {sorted(set(h) - set(schema))}")


def _check_ids(t: str, k: str, ids: list) -> None:
    if len(ids) > MAX_IDS:
        raise ProtocolError(f"{t}: field {k!r} holds {len(ids)} block ids; at most {MAX_IDS}")
    for b in ids:
        if type(b) is not int or not 0 <= b < 2**31:
            raise ProtocolError(f"{t}: field {k!r}: block id {b!r:.40} is not an integer in 0..2^31")
    if len(set(ids)) != len(ids):
        raise ProtocolError(f"{t}: field {k!r} names a block twice")


def _check_spans(t: str, k: str, spans: list) -> None:
    if len(spans) % 2:
        raise ProtocolError(f"{t}: field {k!r} holds {len(spans)} numbers, not pairs [lo, hi] of block ranges")
    last = -1
    for b in spans:  # a few ranges a message: this loop is short
        if type(b) is not int or not last < b < 2**31:
            raise ProtocolError(f"{t}: field {k!r}: {b!r:.40} after {last} — block ranges must be integers in "
                                "0..2^31, in order, none empty, none adjacent")
        last = b


def _arrays(t: str, specs: Any, frames: Sequence[Any]) -> list[np.ndarray]:
    lo, hi = ARRAY_COUNT.get(t, (0, 0))
    if type(specs) is not list or not lo <= len(specs) <= hi:
        raise ProtocolError(f"{t}: array list {specs!r:.80} must hold {lo}..{hi} [dtype, shape] pairs")
    if len(frames) != len(specs):
        raise ProtocolError(f"{t}: header declares {len(specs)} arrays but {len(frames)} data frames came")
    out = []
    for i, spec in enumerate(specs):
        if not (type(spec) is list and len(spec) == 2 and type(spec[1]) is list):
            raise ProtocolError(f"{t}: array {i}: spec {spec!r:.80} is not [dtype, shape]")
        dt, shape = spec
        dtype = ALLOWED_DTYPES.get(dt) if type(dt) is str else None  # type first: a list would raise TypeError
        if dtype is None:
            raise ProtocolError(f"{t}: array {i}: dtype {dt!r:.20} not allowed; allowed: {sorted(ALLOWED_DTYPES)}")
        count = 1  # elements, as a Python int: 2^39 × 2^39 must not wrap to a small number
        for s in shape:
            if type(s) is not int or not 0 <= s < 2**40:
                count = -1
                break
            count *= s
        if count < 0 or not 1 <= len(shape) <= 2:
            raise ProtocolError(f"{t}: array {i}: shape {shape!r:.80} must be 1 or 2 non-negative integers")
        nbytes = count * dtype.itemsize
        buf = _buffer(frames[i])
        if nbytes > MAX_ARRAY_BYTES or buf.nbytes != nbytes:
            raise ProtocolError(f"{t}: array {i}: {dt}{tuple(shape)} needs {nbytes} bytes, the frame has {buf.nbytes}"
                                f" (limit {MAX_ARRAY_BYTES})")
        a = np.frombuffer(buf, dtype=dtype)  # read-only view of the frame: no copy
        out.append(a if len(shape) == 1 else a.reshape(shape))
    return out
