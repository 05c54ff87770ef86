"""python -m qsae.bench [--quick] [--out DIR]: the benchmark tables and plots (see __init__)."""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # before numpy loads: one core per process

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from . import machine  # noqa: E402

FULL = dict(sizes=[1000, 10_000, 100_000, 1_000_000], workers=[1, 2, 4], evals=10, repeat=3,
            alt_sizes=[10_000, 100_000], round_workers=[1, 2, 4, 8, 16, 32, 64], round_repeat=200,
            opt=dict(m=10_000, seconds=15.0, seeds=3), approx=([1000, 10_000, 100_000], [2, 4, 8, 16]),
            cluster=dict(m=100_000, evals=10, iters=60))
QUICK = dict(sizes=[1000, 10_000], workers=[1, 2], evals=4, repeat=2, alt_sizes=[10_000],
             round_workers=[1, 2, 4], round_repeat=30, opt=dict(m=2000, seconds=1.5, seeds=3),
             approx=([1000, 10_000], [2, 4]), cluster=dict(m=60_000, evals=3, iters=12))


def main(argv: list[str] | None = None) -> int:
    from . import __doc__ as sections

    ap = argparse.ArgumentParser(
        prog="python -m qsae.bench", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="qsae's benchmark tables and plots, every figure measured in one run on this machine "
                    "(about 9 minutes on 2 cores; --quick about 2).\n\n" + sections.split("\n\n", 1)[1].split(
                        "\n\nTimings")[0],
        epilog="Writes DIR/report.md, one markdown file per table and speedup.png, optimizers.png; prints the "
               "tables as they come. The dask comparison needs pip install -e '.[bench]'.")
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke run of a minute or two")
    ap.add_argument("--out", type=Path, default=Path("bench-out"), metavar="DIR",
                    help="directory for the tables and plots (default: bench-out)")
    ap.add_argument("--only", choices=("cluster",), default=None,
                    help="run one group of sections: cluster (uneven workers, churn, a straggler)")
    args = ap.parse_args(argv)
    p = QUICK if args.quick else FULL
    args.out.mkdir(parents=True, exist_ok=True)
    report: list[str] = [f"# qsae benchmarks{' (--quick)' if args.quick else ''}\n", f"{machine()}\n"]
    t0 = time.perf_counter()

    def section(name: str, title: str, text: str) -> None:
        (args.out / f"{name}.md").write_text(text)
        block = f"\n## {title}\n\n{text}"
        report.append(block)
        print(block, flush=True)

    cl = _cluster(p["cluster"], section)
    if args.only == "cluster":
        (args.out / "report.md").write_text("".join(report))
        return 0
    from .quality import approx_error, compare_optimizers
    from .roundtrip import table as round_table
    from .scaling import alternatives, multicore

    text, fig = multicore(p["sizes"], p["workers"], p["evals"], p["repeat"])
    section("multicore", f"Workers × patches ({p['evals']} evaluations of a fixed θ sequence each)", text)
    _speedup_plot(fig, p, args.out / "speedup.png")
    exact_vs_avg = [[m, f"{fig[(2, m, 'exact')] / fig[(2, m, 'average')]:.3f}"] for m in p["sizes"]]
    from . import markdown

    section("exact_vs_average", "Exact against average protocol, 2 workers (time ratio)",
            markdown(["patches", "exact / average"], exact_vs_avg))
    alt_text, notes, dask = "", [], {}
    for m in p["alt_sizes"]:
        t, times, n = alternatives(m, p["evals"], p["repeat"], fig.get((2, m, "exact")))
        alt_text += f"\n{m} patches:\n\n{t}"
        notes += [x for x in n if x not in notes]
        dask[m] = times.get("dask.distributed, shards scattered once")
    section("alternatives", "The same workload through the alternatives", alt_text + "".join(f"\n{x}\n" for x in notes))
    text, rounds = round_table(p["round_workers"], p["round_repeat"])
    section("roundtrip", "One round with tiny shards (10 rows a worker) against the number of workers", text)
    section("optimizers", f"Optimizers, {p['opt']['m']} patches, {p['opt']['seconds']:g} s a run, "
            f"{p['opt']['seeds']} seeds (CG and L-BFGS through 2 workers; SGD in process)",
            compare_optimizers(**p["opt"], workers=2, png=args.out / "optimizers.png", echo=lambda s: None))
    section("approx_error", "Average protocol: relative error of the cost, and of the gradient, at θ0",
            approx_error(None, None, *p["approx"]))
    section("targets", "Targets", _targets(fig, rounds, dask, p, cl))
    report.append(f"\n{time.perf_counter() - t0:.0f} s in all.\n")
    (args.out / "report.md").write_text("".join(report))
    print(f"\nwrote {args.out}/report.md, the tables and speedup.png, optimizers.png ({time.perf_counter() - t0:.0f} s)")
    return 0


def _speedup_plot(fig: dict, p: dict, path: Path) -> None:
    from ..viz import save_speedup

    ks = p["workers"]
    speedups = [[fig["local"][m] / fig[(k, m, "exact")] for k in ks] for m in p["sizes"]]
    save_speedup(ks, speedups, path, labels=[f"{m} patches" for m in p["sizes"]])


def _cluster(c: dict, section) -> dict:
    """The uneven-cluster sections; their figures for the targets."""
    from .cluster import churn, heterogeneous, straggler

    text, het = heterogeneous(c["m"], c["evals"])
    section("heterogeneous", f"Heterogeneous: 2 workers, one on a core shared with a busy process, {c['m']} patches",
            text)
    text, ch = churn(c["m"], c["iters"])
    section("churn", f"Churn: L-BFGS for {c['iters']} iterations on {c['m']} patches", text)
    text, st = straggler(c["m"])
    section("straggler", f"Straggler: 3 workers, {c['m']} patches, worker_timeout 5 s", text)
    return {"het": het, "churn": ch, "straggler": st}


def _targets(fig: dict, rounds: dict, dask: dict, p: dict, cl: dict) -> str:
    from . import markdown

    rows = []

    def check(what: str, value: float | None, ok: bool | None, target: str) -> None:
        rows.append([what, "not measured" if value is None else f"{value:.3g}", target,
                     "—" if ok is None else ("pass" if ok else "FAIL")])

    for m, need in ((1000, 1.0), (10_000, 1.7), (100_000, 1.9), (1_000_000, 1.9)):
        s = fig["local"][m] / fig[(2, m, "exact")] if (2, m, "exact") in fig else None
        check(f"2-worker speedup at {m}", s, None if s is None else s >= need, f"≥ {need}")
    k = max(rounds)
    check(f"round with {k} workers, ms", rounds[k] * 1e3, rounds[k] * 1e3 <= 5.0 if k == 64 else None, "≤ 5 (at 64)")
    d, q = dask.get(10_000), fig.get((2, 10_000, "exact"))
    check("qsae / dask per evaluation at 10K", None if d is None else q / d, None if d is None else q / d <= 0.1, "≤ 0.1")
    m = max(p["sizes"])
    r = fig[(2, m, "exact")] / fig[(2, m, "average")]
    check(f"exact / average at {m}", r, r <= 1.03, "≤ 1.03")
    het, ch = cl["het"], cl["churn"]
    if het:
        check("heterogeneous: measured / static", het["measured"] / het["static"],
              het["measured"] / het["static"] <= 0.80, "≤ 0.80")
    check("churn: extra seconds", ch["churn"] - ch["calm"], ch["churn"] - ch["calm"] <= 3.0, "≤ 3")
    check("churn: cost history difference", ch["diff"], ch["diff"] <= 1e-10, "≤ 1e-10")
    return markdown(["target", "measured", "wanted", ""], rows)


if __name__ == "__main__":
    sys.exit(main())
