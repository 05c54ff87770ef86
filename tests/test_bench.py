"""python -m qsae.bench --quick as a smoke test (no timing assertions)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from qsae.bench import markdown

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(300)
def test_quick_bench_writes_every_table(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-m", "qsae.bench", "--quick", "--out", str(tmp_path)], env=env,
                       capture_output=True, text=True, timeout=280)
    assert p.returncode == 0, p.stderr[-3000:]
    for name in ("multicore", "exact_vs_average", "alternatives", "roundtrip", "optimizers", "approx_error",
                 "targets", "report"):
        assert (tmp_path / f"{name}.md").stat().st_size > 0, name
    for png in ("speedup.png", "optimizers.png"):
        assert (tmp_path / png).stat().st_size > 0
    report = (tmp_path / "report.md").read_text()
    assert "process pool, data re-sent every call" in report
    assert "dask.distributed, shards scattered once" in report or "dask.distributed skipped" in report
    assert "2-worker speedup at 10000" in report and "cores" in report


def test_markdown_table():
    assert markdown(["a", "b"], [[1, 0.5]]) == "| a | b |\n|---:|---:|\n| 1 | 0.5 |\n"
