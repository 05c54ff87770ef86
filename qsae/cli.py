"""Command lines: ``qsae-master`` (train) and ``qsae-worker`` (serve a shard).

    qsae-master --local                       train in this process (the baseline)
    qsae-master                               train with one local worker per core
    qsae-master --workers 2                   ... with 2 local workers
    qsae-master --hosts hosts/yggdrasil.txt   ... with workers started over SSH
    qsae-master --wait-for 4 --bind 0.0.0.0   ... with workers started by hand
    qsae-worker --connect tcp://MASTER:PORT   a hand-started worker
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from . import __version__
from .errors import QsaeError

__all__ = ["master_main", "worker_main", "build_parser"]

log = logging.getLogger("qsae")


def build_parser() -> argparse.ArgumentParser:
    """The qsae-master argument parser (every option has a default and one line of help)."""
    p = argparse.ArgumentParser(
        prog="qsae-master",
        description="Train a sparse autoencoder on natural-image patches, in one process or with workers.",
    )
    p.add_argument("--version", action="version", version=f"qsae {__version__}")
    where = p.add_argument_group("where the cost is computed")
    where.add_argument("--local", action="store_true", help="compute in this process, no workers (the baseline)")
    where.add_argument("--workers", type=int, default=None, help="local worker processes (default: one per core)")
    where.add_argument("--hosts", type=Path, default=None, help="hosts file: start workers over SSH (see hosts/README.md)")
    where.add_argument("--wait-for", type=int, default=None, help="wait for N hand-started qsae-worker processes")
    where.add_argument("--bind", default=None, help="address the master binds (default: the one that reaches the workers)")
    where.add_argument("--port", type=int, default=0, help="port the master binds (default: any free port)")
    where.add_argument("--protocol", choices=("exact", "average"), default="exact",
                       help="exact: equal to the one-process cost; average: the report's approximation")
    where.add_argument("--keys", default=None, help="CURVE key directory for hand-started workers (see --make-keys)")
    where.add_argument("--make-keys", default=None, metavar="DIR",
                       help="write a server and a worker key pair to DIR and exit")
    where.add_argument("--insecure", action="store_true", help="no CURVE encryption or authentication (warns)")
    where.add_argument("--accept-new-host-keys", action="store_true", help="trust SSH hosts not yet in known_hosts")
    where.add_argument("--min-workers", type=int, default=None, help="go on if at least this many workers start")
    where.add_argument("--ssh-config", default="~/.ssh/config", help="OpenSSH client config for --hosts")
    data = p.add_argument_group("data")
    data.add_argument("--images", default="builtin",
                      help="'builtin' (ten images shipped with scikit-image), IMAGES.mat, .npy/.npz, or a folder of PNG/JPEG")
    data.add_argument("--whiten", choices=("auto", "yes", "no"), default="auto",
                      help="whiten the images (auto: yes for photos, no for .mat/.npy already whitened)")
    data.add_argument("--patches", type=int, default=10_000, help="number of patches m")
    data.add_argument("--patch-size", type=int, default=8, help="patch side (n_visible = side²)")
    model = p.add_argument_group("model")
    model.add_argument("--preset", choices=("default", "report", "ufldl"), default="default",
                       help="settings: default (sharp edges), report (h=30, λ=0.002, β=4, ρ=0.002), ufldl")
    model.add_argument("--hidden", type=int, default=None, help="hidden units h (overrides the preset)")
    model.add_argument("--weight-decay", type=float, default=None, help="λ (overrides the preset)")
    model.add_argument("--beta", type=float, default=None, help="sparsity weight β (overrides the preset)")
    model.add_argument("--rho", type=float, default=None, help="sparsity target ρ (overrides the preset)")
    run = p.add_argument_group("run")
    run.add_argument("--optimizer", choices=("lbfgs", "cg", "sgd"), default="lbfgs", help="optimizer")
    run.add_argument("--iters", type=int, default=400, help="optimizer iterations")
    run.add_argument("--seed", type=int, default=0, help="seed of the patches and the initial weights")
    run.add_argument("--out", type=Path, default=Path("runs/latest"), help="output directory")
    run.add_argument("--resume", type=Path, default=None,
                     help="continue the run in DIR from its model.npz (same data and model; --iters counts all)")
    run.add_argument("--checkpoint-every", type=int, default=10, help="iterations between checkpoints of model.npz")
    run.add_argument("--threads", type=int, default=1,
                     help="BLAS threads of the master's own arithmetic (--local) and of each worker")
    run.add_argument("-q", "--quiet", action="store_true", help="no per-iteration lines")
    return p


def _config(args: argparse.Namespace):
    from dataclasses import replace

    from .model import SAEConfig

    cfg = SAEConfig.preset(args.preset)
    overrides = {
        "n_visible": args.patch_size**2,
        "n_hidden": args.hidden,
        "weight_decay": args.weight_decay,
        "sparsity_weight": args.beta,
        "sparsity_target": args.rho,
    }
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


def _data_spec(args: argparse.Namespace):
    from .data import DataSpec

    whiten = {"auto": None, "yes": True, "no": False}[args.whiten]
    return DataSpec(source=str(args.images), whiten=whiten, m=args.patches, patch_size=args.patch_size, seed=args.seed)


def _run(args: argparse.Namespace) -> int:
    from .data import DataSpec
    from .model import cost_and_grad, init_params
    from .train import RunSpec, load_model, train

    if args.resume is not None:
        theta0, cfg, meta = load_model(args.resume / "model.npz")
        spec_data, done = DataSpec.from_dict(meta["data"]), int(meta["iteration"])
        args.optimizer, args.out = meta.get("optimizer", args.optimizer), args.resume
        if done >= args.iters:
            print(f"{args.resume} already has {done} iterations (--iters {args.iters}): nothing to do")
            return 0
        print(f"resuming {args.resume} at iteration {done} with {args.optimizer}"
              + ("; L-BFGS starts with an empty memory (its curvature pairs are not saved)"
                 if args.optimizer == "lbfgs" else ""))
    else:
        cfg, spec_data, done = _config(args), _data_spec(args), 0
        theta0 = init_params(cfg, seed=args.seed)
    echo = (lambda s: None) if args.quiet else print
    spec = RunSpec(config=cfg, data=spec_data.to_dict(), method=args.optimizer, maxiter=args.iters - done,
                   out=args.out, checkpoint_every=args.checkpoint_every, start_iteration=done)
    needs_local_X = args.local or args.optimizer == "sgd"
    X = spec_data.build() if needs_local_X else None
    if args.optimizer == "sgd":
        from .optim import array_sampler

        spec.options = {"sampler": array_sampler(X), "config": cfg, "seed": args.seed}
    if args.local:
        print(f"qsae {__version__}: {cfg}, {X.shape[0]} patches, in this process")
        result = train(lambda th: cost_and_grad(th, X, cfg), theta0, spec, echo=echo)
        return _exit_status(result)
    with _master(args, cfg) as master:
        images = spec_data.images()
        master.scatter_images(images, m=spec_data.m, patch_size=spec_data.patch_size, seed=spec_data.seed)
        print(f"qsae {__version__}: {cfg}, {spec_data.m} patches on {master.n_workers} workers, {args.protocol} protocol")
        result = train(master, theta0, spec, echo=echo)
    return _exit_status(result)


def _exit_status(result) -> int:
    """0 for a run that ended normally (converged or out of iterations), 130 for Ctrl-C."""
    return {0: 0, 1: 0, 2: 0, 130: 130}.get(result.status, 1)


def _master(args: argparse.Namespace, cfg):
    from .master import Master

    options = dict(config=cfg, protocol=args.protocol, port=args.port, keys=args.keys)
    if args.insecure:
        options["curve"] = False
    if args.bind:
        options["bind"] = args.bind
    if args.hosts is not None:
        from .launch import SSHLauncher, parse_hosts

        launcher = SSHLauncher(parse_hosts(args.hosts), accept_new_host_keys=args.accept_new_host_keys,
                               min_workers=args.min_workers, ssh_config=args.ssh_config)
        return Master(launcher=launcher, **options)
    if args.wait_for is not None:
        return Master(workers=0, wait_for=args.wait_for, **options)
    return Master(workers=args.workers or os.cpu_count() or 1, **options)


def master_main(argv: list[str] | None = None) -> int:
    """Entry point of ``qsae-master``; returns the exit status."""
    args = build_parser().parse_args(argv)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(args.threads))  # before numpy loads: one core per process
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        if args.make_keys:
            from .keys import make_keys

            d = make_keys(args.make_keys)
            print(f"wrote {d}/server.key(_secret) and {d}/worker.key(_secret); copy {d} to every node, then\n"
                  f"  qsae-master --wait-for N --bind 0.0.0.0 --port PORT --keys {d}\n"
                  f"  qsae-worker --connect tcp://MASTER:PORT --keys {d}")
            return 0
        return _run(args)
    except QsaeError as e:
        notes = "".join(f"\n  {n}" for n in getattr(e, "__notes__", []))
        print(f"qsae-master: error: {e}{notes}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qsae-master: interrupted", file=sys.stderr)
        return 130


def worker_main(argv: list[str] | None = None) -> int:
    """Entry point of ``qsae-worker``: see ``python -m qsae.worker --help``."""
    from .worker import main

    return main(argv)
