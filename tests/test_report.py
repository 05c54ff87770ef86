"""qsae-report on real runs: one file that opens offline in a real Chromium with its pictures."""

from __future__ import annotations

import html
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import browser

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(240)


def run(*args: str, tool: str = "qsae-master") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "bin" / tool), *args], env=env, capture_output=True, text=True,
                          timeout=150)


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory) -> Path:
    """A run of 15 iterations on 2 plain workers, resumed to 30 on one agent of 2 processes (the default)."""
    out = tmp_path_factory.mktemp("run")
    common = ("--workers", "2", "--patches", "4000", "-q", "--dashboard", "off")
    first = run(*common, "--no-agents", "--iters", "15", "--out", str(out))
    assert first.returncode == 0, first.stderr
    second = run(*common, "--iters", "30", "--resume", str(out))
    assert second.returncode == 0, second.stderr
    return out


def test_the_report_opens_offline_with_its_pictures(resumed_run):
    browser.require()
    r = run(str(resumed_run), tool="qsae-report")
    assert r.returncode == 0, r.stderr
    page = resumed_run / "report.html"
    assert r.stdout.strip() == f"wrote {page}"
    text = page.read_text()
    # nothing to fetch: no external address in any src, href or url(...)
    assert not re.search(r"""(src|href)\s*=\s*["']?(?!data:)[a-z]+:""", text, re.I), "an external resource"
    assert "url(" not in text and "<script" not in text
    with browser.chromium(1300, 2400) as d:
        d.set_network_conditions(offline=True, latency=0, download_throughput=0, upload_throughput=0)
        d.get(page.as_uri())
        images = d.execute_script("return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth])")
        body = d.find_element("tag name", "body").text
        assert browser.console_errors(d) == []
    assert {alt for alt, *_ in images} == {"cost curves", "the hidden units' input weights",
                                           "the workers' speeds over the run"}
    assert all(done and width > 0 for _, done, width in images), images
    assert "resumed at iteration\n15" in body or "resumed at iteration 15" in body
    assert re.search(r"final cost \d\.\d{8}", body) and "iterations 30" in body
    assert "finished" in body and "lbfgs" in body and "exact" in body and "float32" in body
    assert body.count("join") >= 3  # two workers joined the first session, an agent the second
    assert "local#0" in body and "local#1" in body
    # the table as last recorded: the agent, its 2 processes and its BLAS (library, version, kernel)
    last = json.loads((resumed_run / "workers.jsonl").read_text().splitlines()[-1])["workers"]
    assert [w["procs"] for w in last] == [2] and last[0]["blas"]
    assert "<th>processes</th>" in text and "<th>BLAS</th>" in text
    assert re.search(rf"<tr><td>local#0</td><td>[^<]*</td><td>{last[0]['pid']}</td><td>2</td>", text)
    assert f"<td>{html.escape(last[0]['blas'])}</td>" in text


def test_python_m_writes_the_same_report_elsewhere(resumed_run, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = tmp_path / "r.html"
    r = subprocess.run([sys.executable, "-m", "qsae.report", str(resumed_run), "-o", str(out)], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert out.read_text().count("data:image/png;base64,") == 3


def test_a_local_run_has_no_workers_section_but_a_report(tmp_path):
    r = run("--local", "--patches", "500", "--iters", "5", "-q", "--dashboard", "off", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    r = run(str(tmp_path), tool="qsae-report")
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "report.html").read_text()
    assert text.count("data:image/png;base64,") == 2 and "no workers.jsonl" in text and "local" in text


@pytest.mark.parametrize("make", ["empty", "missing", "file"])
def test_a_directory_without_a_run_is_one_line_and_exit_2(tmp_path, make):
    target = tmp_path / "d"
    if make == "empty":
        target.mkdir()
    elif make == "file":
        target.write_text("x")
    r = run(str(target), tool="qsae-report")
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith(f"qsae-report: error: {target}") and "--out directory of a qsae-master run" in r.stderr
    assert not (target / "report.html").exists() if target.is_dir() else True
