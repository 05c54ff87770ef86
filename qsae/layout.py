"""The data set's blocks and their holders: the source, block sizes, speeds and moves.

The state the placement planner (``qsae.placement.plan``) reads and its moves change, and
the messages that carry a source or blocks to a worker. No sockets: the coordinator asks
it and sends what it returns (``qsae.coordinator.Send``).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

import numpy as np

from .errors import ConfigError
from .membership import WorkerInfo
from .model import SAEConfig, chunk_rows
from .placement import MAX_BLOCKS, Move, WorkerView, block_bounds, block_rows_for, plan
from .protocol import BLOCKS, MAX_ARRAY_BYTES, MAX_ARRAYS, SOURCE

__all__ = ["Send", "Layout", "CHUNK_BYTES"]

CHUNK_BYTES = 8 * 1024 * 1024  # rows of an array source per BLOCKS message


@dataclass
class Send:
    """One message for the shell to send: to ``ident``, of ``type``, for ``round``."""

    ident: bytes
    type: str
    round: int = 0
    arrays: list = field(default_factory=list)
    fields: dict = field(default_factory=dict)


class Layout:
    """Which rows make which block, who holds which, and what moving one costs.

    Parameters
    ----------
    config : the model's settings (its rows' width, its chunk size).
    dtype : what the workers hold their rows in.
    balance : "measured" (by each worker's speed) or "static" (by its cores).
    block_rows : rows per block (None: ``placement.block_rows_for(m)``).
    """

    def __init__(self, config: SAEConfig, dtype: np.dtype, balance: str, block_rows: int | None) -> None:
        self.config, self.dtype, self.balance, self.block_rows = config, dtype, balance, block_rows
        self.source: dict = {}  # what was scattered: re-sent to joiners, cut or sliced for moves
        self.m = 0
        self.sizes: list[int] = []  # rows of each block
        self.move_seconds = 0.0  # measured cost of moving one block (send, READY), for the planner

    def set_source(self, source: dict, m: int) -> None:
        """A new data set of ``m`` rows: cut it into blocks (of m alone: the bits do not depend
        on the number of workers)."""
        rows = self.block_rows or block_rows_for(m, chunk=chunk_rows(self.config))
        sizes = [hi - lo for lo, hi in block_bounds(m, rows)]
        if len(sizes) > MAX_BLOCKS:
            raise ConfigError(f"block_rows={sizes[0]} cuts {m} rows into {len(sizes)} blocks; at most "
                              f"{MAX_BLOCKS}: give larger blocks (or leave block_rows=None)")
        self.source, self.m, self.sizes = source, m, sizes

    def array_source(self, X: np.ndarray) -> tuple[dict, int]:
        """The source of a plain array's rows (sent in blocks), checked: (source, m)."""
        X = np.asarray(X)
        n = self.config.n_visible
        if X.ndim != 2 or X.shape[1] != n:
            raise ConfigError(f"X has shape {X.shape}; the model needs (m, {n})")
        if X.shape[0] < 1:
            raise ConfigError("X has no rows: pass at least one patch")
        X = np.ascontiguousarray(X, dtype=self.dtype)  # the run's dtype: what the workers hold
        if not np.isfinite(X).all():
            raise ConfigError("X holds NaN or Inf: clean the data (np.nan_to_num) before training")
        rows = self.block_rows or block_rows_for(X.shape[0], chunk=chunk_rows(self.config))
        if rows * X.shape[1] * X.itemsize > MAX_ARRAY_BYTES:
            raise ConfigError(f"{X.shape[0]} rows make blocks of {rows} rows, over the {MAX_ARRAY_BYTES >> 20} MB a "
                              "message carries: use scatter_images (workers cut their own rows) for data this large")
        return {"kind": "array", "X": X}, X.shape[0]

    def images_source(self, images, m: int, patch_size: int = 8, seed: int = 0) -> tuple[dict, int]:
        """The source of ``m`` patches cut from (prepared) images by the workers: (source, m)."""
        from .data import check_patches_match, patch_sigma

        check_patches_match(patch_size, self.config.n_visible)
        if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1:
            raise ConfigError(f"m={m!r}: the number of patches must be a whole number >= 1")
        images = [np.ascontiguousarray(img, dtype=np.float64) for img in images]
        if len(images) > MAX_ARRAYS:
            raise ConfigError(f"{len(images)} images: a run takes at most {MAX_ARRAYS}; tile smaller ones together")
        sigma = patch_sigma(images, patch_size, seed)  # once here, so every worker normalises alike
        return {"kind": "images", "images": images, "patch_size": patch_size, "seed": seed, "sigma": sigma}, int(m)

    def rows(self, b: int) -> int:
        """Rows of block ``b`` (0 for an id this data set does not have)."""
        return self.sizes[b] if 0 <= b < len(self.sizes) else 0

    def uncovered(self, active: list[WorkerInfo]) -> int:
        """Blocks no active worker holds."""
        return len(self.sizes) - len(set().union(*(w.blocks for w in active)))

    def speed(self, w: WorkerInfo, active: list[WorkerInfo]) -> float:
        """Rows/s the planner uses: measured (balance="measured"), else by declared cores."""
        if self.balance == "static":
            return float(w.cores)
        if w.speed is not None:
            return w.speed
        per_core = [v.speed / v.cores for v in active if v.speed is not None]
        return w.cores * statistics.median(per_core) if per_core else float(w.cores)

    def plan(self, active: list[WorkerInfo], rested: bool) -> list[Move]:
        """The planner's moves for the active workers (``rested``: balance by speed too)."""
        views = [WorkerView(w.ident, self.speed(w, active), tuple(sorted(w.blocks))) for w in active]
        return plan(views, self.sizes, move_seconds=self.move_seconds if self.balance == "measured" else 0.0,
                    balance=rested)

    def priced(self, seconds: float, most_blocks: int) -> None:
        """Moves took ``seconds`` for at most ``most_blocks`` blocks a worker: the planner's price."""
        per_block = seconds / max(1, most_blocks)
        self.move_seconds = per_block if self.move_seconds == 0 else 0.5 * (self.move_seconds + per_block)

    def source_send(self, ident: bytes, r: int) -> Send:
        """The SOURCE message: the images (or an array's shape) and how to cut blocks."""
        src = self.source
        return Send(ident, SOURCE, r, list(src.get("images", [])), dict(
            config=self.config.to_dict(), kind=src["kind"], m=self.m, block_rows=self.sizes[0],
            patch_size=src.get("patch_size", 0), seed=src.get("seed", 0), sigma=float(src.get("sigma", 0.0)),
            dtype=self.dtype.name))

    def blocks_sends(self, ident: bytes, r: int, ids: list[int]) -> list[Send]:
        """BLOCKS message(s): ids only for images (the worker cuts them), rows for an array; the
        round number on the last one only (the worker answers READY to it)."""
        if self.source["kind"] == "images":
            return [Send(ident, BLOCKS, r, [], {"ids": ids})]
        X, br = self.source["X"], self.sizes[0]
        per_msg = max(1, min(MAX_ARRAYS, CHUNK_BYTES // (br * X.shape[1] * X.itemsize)))
        return [Send(ident, BLOCKS, r if i + per_msg >= len(ids) else 0,
                     [X[b * br:(b + 1) * br] for b in ids[i:i + per_msg]], {"ids": ids[i:i + per_msg]})
                for i in range(0, len(ids), per_msg)]
