"""qsae.train: the files a run leaves, whatever ends it."""

from __future__ import annotations

import json

import pytest

from qsae.data import DataSpec
from qsae.errors import WorkerLost
from qsae.model import SAEConfig, cost_and_grad, init_params
from qsae.train import RunSpec, load_model, read_history, train

pytestmark = pytest.mark.timeout(60)

CFG = SAEConfig()
DATA = DataSpec(m=500)


@pytest.fixture(scope="module")
def X():
    return DATA.build()


def spec(out, **kw) -> RunSpec:
    return RunSpec(config=CFG, data=DATA.to_dict(), out=out, **kw)


def test_ctrl_c_in_the_progress_line_loses_no_iteration(tmp_path, X):
    """Ctrl-C after an iteration closed but before its line was printed: history.jsonl and
    model.npz still agree on the last completed iteration."""
    def echo(line: str) -> None:
        if line.startswith("iter     5"):
            raise KeyboardInterrupt

    result = train(lambda th: cost_and_grad(th, X, CFG), init_params(CFG), spec(tmp_path, maxiter=50), echo=echo)
    assert result.status == 130
    history = read_history(tmp_path / "history.jsonl")
    theta, _, meta = load_model(tmp_path / "model.npz")
    assert [h["iteration"] for h in history] == list(range(meta["iteration"] + 1)) and meta["iteration"] >= 5
    assert meta["finished"] is False
    assert cost_and_grad(theta, X, CFG)[0] == pytest.approx(history[-1]["cost"], rel=1e-12)


def test_a_run_that_ran_its_iterations_is_finished(tmp_path, X):
    train(lambda th: cost_and_grad(th, X, CFG), init_params(CFG), spec(tmp_path, maxiter=4), echo=lambda s: None)
    _, _, meta = load_model(tmp_path / "model.npz")
    assert meta["iteration"] == 4 and meta["finished"] is True


def test_a_failure_before_the_first_iteration_writes_no_model(tmp_path):
    def gone(theta):
        raise WorkerLost("every worker lost in round 1")

    with pytest.raises(WorkerLost) as e:
        train(gone, init_params(CFG), spec(tmp_path, maxiter=5), echo=lambda s: None)
    assert not (tmp_path / "model.npz").exists()
    assert "--resume" not in "".join(getattr(e.value, "__notes__", []))  # nothing to resume


def test_resume_drops_lines_past_the_checkpoint_and_continues_the_clock(tmp_path, X):
    f = lambda th: cost_and_grad(th, X, CFG)  # noqa: E731
    train(f, init_params(CFG), spec(tmp_path, maxiter=10, checkpoint_every=4, meta={"sigma": 0.5}), echo=lambda s: None)
    _, _, meta = load_model(tmp_path / "model.npz")
    assert meta["sigma"] == 0.5 and meta["seconds"] > 0
    # as if killed -9 after the checkpoint at 8 while iterations 9 and 10 were written
    full = read_history(tmp_path / "history.jsonl")
    theta8 = init_params(CFG)  # any θ: what matters is where the history picks up
    from qsae.train import save_model

    save_model(tmp_path / "model.npz", theta8, CFG, DATA.to_dict(), optimizer="lbfgs", iteration=8,
               seconds=full[8]["seconds"], finished=False)
    train(f, theta8, spec(tmp_path, maxiter=3, start_iteration=8, start_seconds=full[8]["seconds"]),
          echo=lambda s: None)
    history = read_history(tmp_path / "history.jsonl")
    assert [h["iteration"] for h in history] == list(range(12))
    assert history[:9] == full[:9]
    secs = [h["seconds"] for h in history]
    assert secs == sorted(secs) and secs[9] > full[8]["seconds"]


def test_progress_lines_carry_an_eta(tmp_path, X):
    lines = []
    train(lambda th: cost_and_grad(th, X, CFG), init_params(CFG), spec(tmp_path, maxiter=5), echo=lines.append)
    assert len(lines) == 6 and "eta" not in lines[0] and "eta" not in lines[-1]
    assert all("  eta " in ln for ln in lines[1:-1])


def test_read_history_skips_a_cut_last_line(tmp_path):
    p = tmp_path / "history.jsonl"
    p.write_text(json.dumps({"iteration": 0, "seconds": 0.0, "cost": 1.0, "grad_norm": 2.0}) + '\n{"iteration": 1, "sec')
    assert read_history(p) == [{"iteration": 0, "seconds": 0.0, "cost": 1.0, "grad_norm": 2.0}]
    assert read_history(tmp_path / "none.jsonl") == []
