"""Command lines: ``qsae-master`` (train) and ``qsae-worker`` (serve a shard).

    qsae-master --local                       train in this process (the baseline)
    qsae-master                               train with one local worker per core
    qsae-master --workers 2                   ... with 2 local workers
    qsae-master --hosts hosts/yggdrasil.txt   ... with workers started over SSH
    qsae-master --slurm                       ... with workers started by srun inside an allocation
    qsae-master --wait-for 4 --bind 0.0.0.0   ... with workers started by hand
    qsae-worker --connect tcp://MASTER:PORT   a hand-started worker

Every argument is checked before anything is written or any worker starts; a run never
replaces a directory that holds one (``--resume`` continues it, ``--force`` replaces it).
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import math
import os
import sys
from pathlib import Path

from . import __version__
from .errors import ConfigError, DataError, QsaeError, WorkerLost

__all__ = ["master_main", "worker_main", "build_parser"]

log = logging.getLogger("qsae")

RUN_FILES = ("model.npz", "history.jsonl")  # a directory holding either holds a run

_MODES = """\
where the cost is computed (give at most one):
  --local        in this process, no workers (the baseline)
  --workers N    N local processes: one agent that forks them (--no-agents: N workers)
  --hosts FILE   over SSH: one agent per host line of workers=N processes (--no-agents: N workers)
  --slurm        by srun: one agent per node with all its CPUs (--no-agents: one worker per task)
  --wait-for N   N workers started by hand with qsae-worker (needs --keys or --insecure)
  none of them   one local process per core ({cores} on this machine), as --workers
"""


class _Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """``(default: X)`` after every option's help; the description's layout kept. Options whose
    default is None say in words what their absence means; switches are off by default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or "(default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The qsae-master argument parser (every option has a default and one line of help)."""
    p = argparse.ArgumentParser(
        prog="qsae-master", formatter_class=_Help,
        description="Train a sparse autoencoder on natural-image patches, in one process or with workers.\n\n"
                    + _MODES.format(cores=os.cpu_count() or 1),
    )
    p.add_argument("--version", action="version", version=f"qsae {__version__}")
    where = p.add_argument_group("where the cost is computed")
    where.add_argument("--local", action="store_true", help="compute in this process, no workers (the baseline)")
    where.add_argument("--workers", type=int, default=None, metavar="N", help="local worker processes (default: one per core)")
    where.add_argument("--hosts", type=Path, default=None, metavar="FILE", help="hosts file: start workers over SSH (see hosts/README.md; default: none)")
    where.add_argument("--slurm", action="store_true", help="start workers with srun inside a Slurm allocation")
    where.add_argument("--wait-for", type=int, default=None, metavar="N", help="wait for N hand-started qsae-worker processes (default: none)")
    where.add_argument("--agents", action=argparse.BooleanOptionalAction, default=None,
                       help="one agent per machine, the default: --workers N is one agent of N processes, a hosts "
                            "file's workers=N one agent of N processes per host, --slurm one step per node with all "
                            "its CPUs (one connection and one copy of the images per host); --no-agents: a connection "
                            "per process (default: agents, but plain workers for --workers 1 and with --min-workers, "
                            "which counts connections)")
    where.add_argument("--min-workers", type=int, default=None, metavar="N",
                       help="go on once this many workers have started, an agent counting as one (default: all of "
                            "them)")
    where.add_argument("--bind", default=None, help="address the master binds (default: the one that reaches the workers)")
    where.add_argument("--port", type=int, default=0, help="port the master binds (0: any free port)")
    where.add_argument("--protocol", choices=("exact", "average"), default="exact",
                       help="exact: equal to the one-process cost; average: the report's approximation")
    where.add_argument("--balance", choices=("measured", "static"), default="measured",
                       help="measured: rows follow each worker's measured speed; static: by declared cores")
    where.add_argument("--worker-timeout", type=float, default=5.0, help="seconds of silence after which a worker is lost")
    where.add_argument("--start-timeout", type=float, default=60.0, help="seconds to wait for the workers' HELLOs")
    ssh = p.add_argument_group("SSH (--hosts)")
    ssh.add_argument("--connect-timeout", type=float, default=10.0, help="seconds to wait for an SSH connection")
    ssh.add_argument("--accept-new-host-keys", action="store_true", help="trust SSH hosts not yet in known_hosts")
    ssh.add_argument("--ssh-config", default=None, metavar="FILE",
                     help="OpenSSH client config for --hosts (default: ~/.ssh/config where it exists)")
    keys = p.add_argument_group("keys (hand-started workers)")
    keys.add_argument("--keys", default=None, metavar="DIR",
                      help="CURVE key directory made by --make-keys; workers get DIR/worker (default: keys made for this run, for launched workers)")
    keys.add_argument("--make-keys", default=None, metavar="DIR",
                      help="write the master's keys to DIR and the workers' to DIR/worker, then exit (default: no)")
    keys.add_argument("--insecure", action="store_true", help="no CURVE encryption or authentication (warns)")
    data = p.add_argument_group("data")
    data.add_argument("--images", default="builtin",
                      help="'builtin' (ten images shipped with scikit-image), IMAGES.mat, .npy/.npz, or a folder of PNG/JPEG")
    data.add_argument("--whiten", choices=("auto", "yes", "no"), default="auto",
                      help="whiten the images (auto: yes for photos, no for .mat/.npy already whitened)")
    data.add_argument("--patches", type=int, default=10_000, help="number of patches m")
    data.add_argument("--patch-size", type=int, default=8, help="patch side (n_visible = side²)")
    data.add_argument("--dtype", choices=("float64", "float32"), default="float32",
                      help="precision of the patches and of the arithmetic (θ and the sums stay float64): float32 "
                           "trains to the same cost in half the time and memory (README, Performance)")
    model = p.add_argument_group("model")
    model.add_argument("--preset", choices=("default", "report", "ufldl"), default="default",
                       help="settings: default (h=30, λ=1e-4, β=3, ρ=0.01: sharp edges), report (the report's h=30, "
                            "λ=0.002, β=4, ρ=0.002), ufldl (the UFLDL exercise's h=25, λ=1e-4, β=3, ρ=0.01)")
    model.add_argument("--hidden", type=int, default=None, help="hidden units h (default: the preset's)")
    model.add_argument("--weight-decay", type=float, default=None, help="λ (default: the preset's)")
    model.add_argument("--beta", type=float, default=None, help="sparsity weight β (default: the preset's)")
    model.add_argument("--rho", type=float, default=None, help="sparsity target ρ (default: the preset's)")
    run = p.add_argument_group("run")
    run.add_argument("--optimizer", choices=("lbfgs", "cg", "sgd"), default="lbfgs", help="optimizer")
    run.add_argument("--iters", type=int, default=400, help="optimizer iterations (with --resume: in all)")
    run.add_argument("--seed", type=int, default=0, help="seed of the patches and the initial weights")
    run.add_argument("--out", type=_out_dir, default=None, metavar="DIR",
                     help="output directory; refused if it holds a run (see --resume, --force) (default: a new "
                          "runs/YYYYmmdd-HHMMSS per run, runs/latest a link to the newest)")
    run.add_argument("--force", action="store_true", help="replace the run in --out (its model.npz and history)")
    run.add_argument("--resume", type=Path, default=None, metavar="DIR",
                     help="continue the run in DIR from its model.npz (same data and model; --iters counts all; default: a new run)")
    run.add_argument("--checkpoint-every", type=int, default=10, help="iterations between checkpoints of model.npz")
    run.add_argument("--threads", type=int, default=1,
                     help="BLAS threads of the master's own arithmetic (--local) and of each worker")
    run.add_argument("--dashboard", default="127.0.0.1:0", metavar="ADDR:PORT|off",
                     help="serve a live page of the run there (port 0: any free one; its URL is printed at the start; "
                          "an address other than loopback gets a token in the URL)")
    talk = run.add_mutually_exclusive_group()
    talk.add_argument("-q", "--quiet", action="store_true", help="no per-iteration or worker lines, warnings only")
    talk.add_argument("-v", "--verbose", action="store_true", help="debug lines, paramiko's too")
    return p


def _out_dir(text: str) -> Path:
    """--out's type: a directory name; an empty one would put the run in the current folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty name would write the run into the current folder: give a "
                                         "directory, e.g. --out runs/try (without --out each run gets a new runs/YYYYmmdd-HHMMSS)")
    return Path(text)


RUNS = Path("runs")  # where runs without --out go, one new folder each; runs/latest links to the newest


def _new_run_dir() -> Path:
    """runs/YYYYmmdd-HHMMSS, with -2, -3, ... when a run of the same second has it already."""
    import time

    stamp = time.strftime("%Y%m%d-%H%M%S")
    out, k = RUNS / stamp, 1
    while out.exists() or out.is_symlink():
        k += 1
        out = RUNS / f"{stamp}-{k}"
    return out


def _explicit(argv: list[str] | None) -> set[str]:
    """The destinations of the options given on the command line (not left at their default)."""
    p = build_parser()
    for action in p._actions:  # a default of SUPPRESS leaves the attribute unset unless given
        action.default = argparse.SUPPRESS
    return set(vars(p.parse_args(argv)))


# ---------------------------------------------------------------------- checks (nothing written yet)
def _check_args(args: argparse.Namespace, given: set[str]) -> None:
    """Every flag alone and in combination; a ConfigError naming the flag and the fix."""
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    modes = [f for f, on in (("--local", args.local), ("--workers", args.workers is not None),
                              ("--hosts", args.hosts is not None), ("--slurm", args.slurm),
                              ("--wait-for", args.wait_for is not None)) if on]
    need(len(modes) <= 1, f"{' and '.join(modes)} are different ways to run: give one of them (no flag: one local "
                          f"worker per core)")
    need(args.workers is None or args.workers >= 1,
         f"--workers {args.workers}: give N >= 1 local workers (or leave it out for one per core, or --local)")
    need(args.wait_for is None or args.wait_for >= 1, f"--wait-for {args.wait_for}: give N >= 1 hand-started workers")
    need(not (args.agents and (args.local or args.wait_for is not None)),
         "--agents starts agents with --workers N, --hosts FILE or --slurm; hand-started ones are `qsae-worker "
         "--procs N`, and --local starts none: drop --agents")
    need(not (args.agents and _here(args) and args.min_workers is not None),
         "--min-workers counts connections, and local processes with --agents are one (one agent): drop --agents "
         "to start plain workers of which --min-workers may go on without the others")
    if args.min_workers is not None:
        need(not args.local, "--min-workers means nothing with --local (no workers): drop one of them")
        need(args.min_workers >= 1, f"--min-workers {args.min_workers}: give N >= 1")
        n = args.workers if args.workers is not None else args.wait_for
        need(n is None or args.min_workers <= n,
             f"--min-workers {args.min_workers} is more than the {n} workers asked for: give at most {n}")
    need(args.patches >= 1, f"--patches {args.patches}: give the number of patches, >= 1 (e.g. 10000)")
    need(args.patch_size >= 1, f"--patch-size {args.patch_size}: give the patch side in pixels, >= 1 (e.g. 8)")
    need(args.iters >= 1, f"--iters {args.iters}: give the number of optimizer iterations, >= 1 (e.g. 400)")
    need(0 <= args.seed < 2**63, f"--seed {args.seed}: give a whole number from 0 to 2^63 - 1 (e.g. 0)")
    need(args.checkpoint_every >= 0, f"--checkpoint-every {args.checkpoint_every}: give >= 0 (0: at the end only)")
    need(args.threads >= 1, f"--threads {args.threads}: give >= 1 BLAS threads")
    need(0 <= args.port <= 65535, f"--port {args.port}: give 0 (any free port) or a port from 1 to 65535")
    from .dashboard import parse_address

    parse_address(args.dashboard)  # ADDR:PORT or off, else a ConfigError naming the forms
    need(args.hidden is None or args.hidden >= 1, f"--hidden {args.hidden}: give >= 1 hidden units (e.g. 30)")
    for flag, value in (("--weight-decay", args.weight_decay), ("--beta", args.beta)):
        need(value is None or 0 <= value < math.inf, f"{flag} {value}: give a finite number >= 0")
    need(args.rho is None or 0 < args.rho < 1, f"--rho {args.rho}: sparsity_target={args.rho} must lie strictly "
                                               f"between 0 and 1 (e.g. 0.01)")
    for flag in ("worker_timeout", "start_timeout", "connect_timeout"):
        value = getattr(args, flag)
        need(0 < value < math.inf, f"--{flag.replace('_', '-')} {value}: give a finite number of seconds > 0")
    need(not (args.keys and args.insecure), "--keys and --insecure contradict each other: give one")
    need(not (args.wait_for and not args.keys and not args.insecure),
         "--wait-for needs --keys DIR (make it with `qsae-master --make-keys DIR`; workers get --keys DIR/worker) "
         "or --insecure")
    if args.hosts is not None:
        need(args.hosts.is_file(), f"--hosts {args.hosts}: no such file (see hosts/README.md for its format)")
    if args.ssh_config is not None:
        need(args.hosts is not None, f"--ssh-config {args.ssh_config} is for workers over SSH: give --hosts FILE too, "
                                     "or drop it")
        need(Path(args.ssh_config).expanduser().is_file(),
             f"--ssh-config {args.ssh_config}: no such file; give an OpenSSH client config (ssh_config(5)) or leave "
             "it out for ~/.ssh/config")
    if args.resume is not None:
        need(not args.force, "--force starts a new run and --resume continues one: give one of them")
        need("out" not in given or args.out == args.resume,
             f"--resume {args.resume} continues the run in {args.resume}: drop --out {args.out}")
        need((args.resume / "model.npz").is_file(),
             f"--resume {args.resume}: no run there (no {args.resume / 'model.npz'}); start one with --out {args.resume}")
    else:
        held = [f for f in RUN_FILES if (args.out / f).exists()]
        need(not held or args.force,
             f"{args.out} holds a run ({', '.join(held)}): continue it with --resume {args.out}, replace it with "
             f"--force, or give another --out")
        need(not args.out.exists() or args.out.is_dir(), f"--out {args.out} is a file: give a directory")


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
    # an absolute path and the files' fingerprint: --resume finds the same images from any folder, or refuses
    return DataSpec.of(str(args.images), whiten=whiten, m=args.patches, patch_size=args.patch_size, seed=args.seed)


def _contradictions(args: argparse.Namespace, given: set[str], cfg, data: dict, meta: dict) -> list[str]:
    """'--flag value (the run has saved)' for every explicit flag the saved run contradicts."""
    from .model import SAEConfig

    out = []

    def check(dest: str, flag: str, wanted, saved) -> None:
        if dest in given and wanted != saved:
            out.append(f"{flag} {wanted} (the run has {saved})")

    check("patches", "--patches", args.patches, data.get("m"))
    check("patch_size", "--patch-size", args.patch_size, data.get("patch_size"))
    check("seed", "--seed", args.seed, data.get("seed"))
    if "images" in given and data.get("fingerprint"):  # the images moved: the same files are welcome anywhere
        from .data import source_fingerprint

        try:
            given_print = source_fingerprint(args.images)
        except QsaeError:
            given_print = None
        if given_print != data["fingerprint"]:
            out.append(f"--images {args.images} (other images than the run's {data.get('source')}: their files' "
                       f"fingerprint is {given_print}, the run's {data['fingerprint']})")
    elif "images" in given and str(args.images) != data.get("source") and \
            Path(args.images).resolve() != Path(str(data.get("source"))).resolve():
        out.append(f"--images {args.images} (the run has {data.get('source')})")
    if "whiten" in given and {"auto": None, "yes": True, "no": False}[args.whiten] != data.get("whiten"):
        saved = {None: "auto", True: "yes", False: "no"}.get(data.get("whiten"), data.get("whiten"))
        out.append(f"--whiten {args.whiten} (the run has {saved})")
    check("optimizer", "--optimizer", args.optimizer, meta.get("optimizer", "lbfgs"))
    check("dtype", "--dtype", args.dtype, meta.get("dtype", "float64"))
    preset = SAEConfig.preset(args.preset) if "preset" in given else None
    differ = []
    for dest, flag, field in (("hidden", "--hidden", "n_hidden"), ("weight_decay", "--weight-decay", "weight_decay"),
                              ("beta", "--beta", "sparsity_weight"), ("rho", "--rho", "sparsity_target")):
        saved = getattr(cfg, field)
        if dest in given:
            check(dest, flag, getattr(args, dest), saved)
        elif preset is not None and getattr(preset, field) != saved:
            differ.append(f"{field} {getattr(preset, field)} where the run has {saved}")
    if differ:
        out.append(f"--preset {args.preset} ({', '.join(differ)})")
    return out


def _plan(args: argparse.Namespace, given: set[str]) -> dict:
    """Everything the run needs, checked, before anything is written: config, data, θ0, where."""
    from .data import DataSpec
    from .model import init_params
    from .train import load_model, read_history

    if args.out is None:  # a new folder per run, so that two commands never meet (runs/latest: the newest)
        args.out, args.fresh_out = (args.resume, False) if args.resume is not None else (_new_run_dir(), True)
    _check_args(args, given)
    if args.resume is not None:
        theta0, cfg, meta = load_model(args.resume / "model.npz")  # a DataError naming the file
        wrong = _contradictions(args, given, cfg, meta["data"], meta)
        if wrong:
            raise ConfigError(f"--resume {args.resume}: {'; '.join(wrong)}: a resumed run keeps its data, model and "
                              f"optimizer; drop these flags, or start a new run with another --out")
        spec_data, done = DataSpec.from_dict(meta["data"]), int(meta["iteration"])
        if "images" in given and spec_data.fingerprint:  # the run's images, found where they are now
            from dataclasses import replace

            spec_data = replace(spec_data, source=str(Path(args.images).expanduser().resolve()))
        try:
            spec_data.check_source()
        except DataError as e:
            raise DataError(f"--resume {args.resume}: {e}" + ("" if "images" in given else
                            "; if they moved, pass --images PATH where they are now")) from None
        args.optimizer, args.dtype, args.out = meta.get("optimizer", args.optimizer), meta.get("dtype", "float64"), args.resume
        history = read_history(args.resume / "history.jsonl")
        seconds = float(meta.get("seconds", next((h["seconds"] for h in reversed(history)
                                                    if h["iteration"] == done), 0.0)))
    else:
        cfg, spec_data, done, seconds = _config(args), _data_spec(args), 0, 0.0
        theta0 = init_params(cfg, seed=args.seed)
    images = spec_data.images()  # unreadable or missing images fail here, before any worker starts
    from .data import check_images, check_patches_match, patch_sigma, sample_patches
    from .train import check_size

    check_patches_match(spec_data.patch_size, cfg.n_visible)
    check_images(images, spec_data.patch_size, f"--images {spec_data.source}")  # too small, wrong shape: one line
    _master_keywords(args)  # a flag this master cannot honour fails here, not after the log is opened
    launcher = _launcher(args)  # a bad hosts file, or --slurm outside an allocation, fails here too
    local_agent = getattr(launcher, "procs", 1) > 1  # this machine's agent: its processes share the rows here
    n = _n_workers(args) if launcher is None or local_agent else launcher.n_workers
    # too many parameters for L-BFGS, or more memory than this machine has: now, not minutes later
    check_size(cfg, spec_data.m, args.dtype, args.optimizer, n,
               local_workers=(launcher is None or local_agent) and args.wait_for is None)
    sigma = patch_sigma(images, spec_data.patch_size, spec_data.seed)
    if not sigma > 0:
        raise ConfigError(f"--patch-size {spec_data.patch_size} on --images {spec_data.source}: every patch is flat once "
                          "its mean is removed (σ = 0), so there is nothing to learn: "
                          + ("give --patch-size 2 or more (e.g. 8)" if spec_data.patch_size == 1 else
                             "give images with some contrast"))
    sample_patches(images, spec_data.m, patch_size=spec_data.patch_size, seed=spec_data.seed, lo=0, hi=1, sigma=sigma)
    if n is not None and spec_data.m < n:
        raise ConfigError(f"--patches {spec_data.m} is fewer than the {n} workers: give --patches >= {n}, fewer "
                          f"workers, or --local")
    return {"cfg": cfg, "data": spec_data, "done": done, "seconds": seconds, "theta0": theta0, "images": images,
            "sigma": sigma, "launcher": launcher, "loaded": _describe_images(spec_data.source, images)}


def _describe_images(source: str, images: list) -> str:
    """'N images (H×W ...) from SOURCE', and for a folder which entries were skipped and why."""
    sizes = sorted({f"{img.shape[0]}×{img.shape[1]}" for img in images})
    more = len(sizes) - 4
    shown = ", ".join(sizes[:4]) + (f" and {more} more size{'s' * (more > 1)}" if more > 0 else "")
    line = f"{len(images)} image{'s' * (len(images) != 1)} ({shown}) from {source}"
    path = Path(source).expanduser()
    if source != "builtin" and path.is_dir():
        from .data import IMAGE_EXTENSIONS

        folders = sorted(p.name for p in path.iterdir() if p.is_dir())
        others = sorted(p.name for p in path.iterdir() if not p.is_dir() and p.suffix.lower() not in IMAGE_EXTENSIONS)
        for names, why in ((others, f"not {'/'.join(sorted(e.lstrip('.') for e in IMAGE_EXTENSIONS))}"),
                           (folders, "folders are not searched")):
            if names:
                listed = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
                line += f"; skipped {len(names)} ({why}): {listed}"
    return line


def _here(args: argparse.Namespace) -> bool:
    """The workers are local processes that this master starts (``--workers N`` or no mode flag)."""
    return not (args.local or args.wait_for is not None or args.hosts is not None or args.slurm)


def _agents(args: argparse.Namespace) -> bool:
    """``--agents`` as given, else the default: one agent per machine wherever a machine runs several
    processes, but workers where ``--min-workers`` counts them (an agent counts as one)."""
    if args.agents is not None:
        return args.agents
    return not (args.local or args.wait_for is not None or args.min_workers is not None
                or (_here(args) and (args.workers or os.cpu_count() or 1) == 1))


def _launcher(args: argparse.Namespace):
    """The SSH or Slurm launcher the flags ask for (None for local or hand-started workers)."""
    agents = _agents(args)
    if args.hosts is not None:
        from .launch import SSHLauncher, parse_hosts

        return SSHLauncher(parse_hosts(args.hosts), accept_new_host_keys=args.accept_new_host_keys,
                           min_workers=args.min_workers, ssh_config=args.ssh_config or "~/.ssh/config",
                           connect_timeout=args.connect_timeout, agents=agents)
    if args.slurm:
        from .launch import SlurmLauncher

        return SlurmLauncher(agents=agents)  # agents: one step per node, with all its CPUs
    if agents and _here(args):  # this machine: one agent of N processes
        from .launch import LocalLauncher

        return LocalLauncher(1, procs=args.workers or os.cpu_count() or 1)
    return None


def _n_workers(args: argparse.Namespace) -> int | None:
    """The workers the run will start, where known before starting them."""
    if args.local:
        return None
    if args.workers is not None:
        return args.workers
    if args.wait_for is not None:
        return args.wait_for
    if args.hosts is not None or args.slurm:
        return None
    return os.cpu_count() or 1


# ---------------------------------------------------------------------- the run
def _run(args: argparse.Namespace, given: set[str]) -> int:
    import numpy as np

    from .data import sample_patches
    from .model import cost_and_grad
    from .train import RunSpec, train

    plan = _plan(args, given)  # raises before anything is written
    cfg, spec_data, done = plan["cfg"], plan["data"], plan["done"]
    if done >= args.iters:
        print(f"{args.resume} already has {done} iterations (--iters {args.iters}): nothing to do")
        return 0
    _claim_fresh_out(args)  # before anything else is written into it
    from .train import lock_run

    _locks.append(lock_run(args.out))  # one process per run folder: a second is told who holds it
    _open_log(args)  # the first thing written
    board = _start_dashboard(args)  # before the workers start: the page sees them join
    if getattr(args, "fresh_out", False):
        _say(f"run folder: {args.out}" + (f" ({RUNS / 'latest'} links to it)" if _link_latest(args.out) else ""))
    if args.resume is not None:
        _say(f"resuming {args.resume} at iteration {done} with {args.optimizer}"
             + ("; L-BFGS starts with an empty memory (its curvature pairs are not saved)"
                if args.optimizer == "lbfgs" else ""))
    _say(f"data: {plan['loaded']}")
    echo = _PROGRESS.info if args.quiet else _say  # iteration lines: run.log always, the terminal unless -q
    spec = RunSpec(config=cfg, data=spec_data.to_dict(), method=args.optimizer, maxiter=args.iters - done,
                   out=args.out, checkpoint_every=args.checkpoint_every, start_iteration=done,
                   start_seconds=plan["seconds"], meta={"sigma": plan["sigma"], "dtype": args.dtype,
                                                      "protocol": "local" if args.local else args.protocol,
                                                      "resumed": _resumed(args, done)})
    needs_local_X = args.local or args.optimizer == "sgd"
    dtype = {} if args.dtype == "float64" else {"dtype": np.dtype(args.dtype)}
    X = sample_patches(plan["images"], spec_data.m, patch_size=spec_data.patch_size, seed=spec_data.seed,
                       sigma=plan["sigma"], **dtype) if needs_local_X else None
    if args.optimizer == "sgd":
        from .optim import array_sampler

        spec.options = {"sampler": array_sampler(X), "config": cfg, "seed": args.seed}
    if args.local:
        _say(f"qsae {__version__}: {cfg}, {X.shape[0]} patches, in this process")
        result = train(lambda th: cost_and_grad(th, X, cfg), plan["theta0"], spec, echo=echo, say=_say,
                       dashboard=board)
        return _exit_status(result)
    with _master(args, cfg, plan["launcher"], board) as master:
        if board is not None:
            board.settings(master=master.address, workers=master.n_workers)
        try:
            master.scatter_images(plan["images"], m=spec_data.m, patch_size=spec_data.patch_size, seed=spec_data.seed)
        except WorkerLost:  # not the master's advice to resume a checkpoint: none was written by this run
            kept = (f"{args.out / 'model.npz'} is unchanged: --resume {args.out} once the workers run" if args.resume
                    else "no iteration ran and nothing was saved")
            raise WorkerLost(f"every worker was lost while it prepared its rows, before the first iteration ({kept}): "
                             f"see each worker's lines in {args.out / 'run.log'}; --worker-timeout (now "
                             f"{args.worker_timeout:g} s) waits longer for a slow one") from None
        _say(f"qsae {__version__}: {cfg}, {spec_data.m} patches on {_placed(master)}, {args.protocol} protocol")
        objective = _SpeedSamples(master, args.out / "workers.jsonl")
        result = train(objective, plan["theta0"], spec, echo=echo, say=_say, dashboard=board)
    return _exit_status(result)


def _placed(master) -> str:
    """"3 workers", or "2 agents of 4 processes" / "1 agent of 2 processes and 1 worker": what computes."""
    from .membership import processes

    status = master.status()
    agents = [processes(w["procs"]) for w in status if w["procs"]]
    plain = len(status) - len(agents)
    parts = []
    if agents:
        each = f"{agents[0]}" if len(set(agents)) == 1 else f"{min(agents)}-{max(agents)}"
        parts.append(f"{len(agents)} agent{'s' * (len(agents) > 1)} of {each} processes")
    if plain or not agents:
        parts.append(f"{plain} worker{'s' * (plain != 1)}")
    return " and ".join(parts)


def _exit_status(result) -> int:
    """0 for a run that ended normally (converged or out of iterations), 130 for Ctrl-C."""
    return {0: 0, 1: 0, 2: 0, 130: 130}.get(result.status, 1)


def _master_keywords(args: argparse.Namespace) -> dict:
    """Master keywords of the features being added (dtype, balance, min_workers, on_event, a
    Slurm launcher): each passed only when asked for, and refused by name when this Master
    cannot take it, so the defaults run on any Master."""
    import inspect

    if args.local:
        return {}
    from .master import Master

    accepts = inspect.signature(Master).parameters
    wanted = {}
    if args.dtype != "float64":
        wanted["dtype"] = ("--dtype", args.dtype)
    if args.balance != "measured":
        wanted["balance"] = ("--balance", args.balance)
    if args.min_workers is not None and args.hosts is None:  # with --hosts the SSHLauncher takes it too
        wanted["min_workers"] = ("--min-workers", args.min_workers)
    missing = [f"{flag} {value}" for key, (flag, value) in wanted.items() if key not in accepts]
    if missing:
        raise ConfigError(f"{', '.join(missing)}: not supported by this version's master; leave it out")
    out = {key: value for key, (flag, value) in wanted.items()}
    if "on_event" in accepts:
        out["on_event"] = _EventLog(args.out / "workers.jsonl", quiet=args.quiet)
    if args.min_workers is not None and args.hosts is not None and "min_workers" in accepts:
        out["min_workers"] = args.min_workers
    return out


def _start_dashboard(args: argparse.Namespace):
    """The run's live page (None with --dashboard off); its URL printed, closed by master_main."""
    from .dashboard import Dashboard

    if args.dashboard.strip().lower() == "off":
        return None
    board = Dashboard(args.dashboard).start()  # a port in use: a ConfigError naming --dashboard
    _boards.append(board)
    print(f"dashboard: {board.url}", flush=True)
    return board


def _resumed(args: argparse.Namespace, done: int) -> list[int]:
    """The iterations at which this run was resumed, this one included (for qsae-report)."""
    if args.resume is None:
        return []
    from .train import load_model

    return [*load_model(args.resume / "model.npz")[2].get("resumed", []), done]


_boards: list = []  # the dashboards this process started (closed at the end of master_main)


def _fan_out(*hooks):
    """One on_event that calls each hook given (None skipped) in turn."""
    hooks = [h for h in hooks if h is not None]

    def on_event(event: dict) -> None:
        for hook in hooks:
            hook(event)

    return on_event


class _SpeedSamples:
    """The master as train's objective, adding the workers' table to workers.jsonl as a
    "speeds" line every SECONDS (events alone say nothing of speeds between placements;
    qsae-report draws the workers' speeds over the run from these). Every other attribute is
    the master's."""

    SECONDS = 2.0  # a line of ~150 bytes a worker: 64 workers for an hour make 17 MB

    def __init__(self, master, path: Path) -> None:
        self.master, self.path, self.last = master, path, 0.0

    def __call__(self, theta):
        out = self.master(theta)
        import time

        now = time.monotonic()
        if now - self.last >= self.SECONDS:
            self.last = now
            line = {"time": time.time(), "event": "speeds", "detail": "", "workers": self.master.status()}
            with open(self.path, "a") as f:
                f.write(json.dumps(line, default=str) + "\n")
        return out

    def __getattr__(self, name: str):
        return getattr(self.master, name)


def _master(args: argparse.Namespace, cfg, launcher=None, board=None):
    from .master import Master

    options = dict(config=cfg, protocol=args.protocol, port=args.port, keys=args.keys,
                   worker_timeout=args.worker_timeout, start_timeout=args.start_timeout, **_master_keywords(args))
    if args.insecure:
        options["curve"] = False
    if args.bind:
        options["bind"] = args.bind
    if board is not None:  # the page hears of joins, losses and moves as workers.jsonl does
        options["on_event"] = _fan_out(options.get("on_event"), board.on_event)
    if launcher is not None:
        return Master(launcher=launcher, **options)
    if args.wait_for is not None:
        return Master(workers=0, wait_for=args.wait_for, **options)
    return Master(workers=args.workers or os.cpu_count() or 1, **options)


class _EventLog:
    """Master(on_event=...): every membership or placement event as a line of DIR/workers.jsonl.

    The event itself is already one log line (join, leave, lost, return, move); after a
    placement ("move") and unless quiet, the workers' rows: a table of name state rows rows/s
    for up to TABLE_WORKERS workers, else a one-line summary (64 workers made 2,144 lines)."""

    TABLE_WORKERS = 8  # a table this long still fits beside the iteration lines

    def __init__(self, path: Path, quiet: bool = False) -> None:
        self.path, self.quiet = path, quiet

    def __call__(self, event: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(event, default=str) + "\n")
        if self.quiet or event.get("event") != "move":
            return
        for line in self.lines(event.get("workers") or []):
            _say(line)

    @classmethod
    def lines(cls, workers: list[dict]) -> list[str]:
        """The table (few workers) or the summary line (many) of the workers' rows and speeds."""
        from .membership import processes

        def rate(w: dict) -> float | None:
            r = w.get("rows_per_s")
            return r if isinstance(r, (int, float)) and r == r else None

        if len(workers) <= cls.TABLE_WORKERS:
            return [f"  {w.get('name', '?'):<16} {w.get('state', '?'):<8} {w.get('rows', 0):>9} rows  "
                    + (f"{rate(w):,.0f} rows/s" if rate(w) is not None else "- rows/s")
                    + (f"  ({processes(w['procs'])} processes)" if w.get("procs") else "") for w in workers]
        states = collections.Counter(w.get("state", "?") for w in workers)
        rows = [w.get("rows", 0) for w in workers if w.get("rows", 0)]
        rates = [r for r in map(rate, workers) if r is not None]
        line = (f"workers: {len(workers)} ({', '.join(f'{n} {s}' for s, n in sorted(states.items()))}), "
                f"{sum(rows):,} rows, {min(rows, default=0):,}–{max(rows, default=0):,} rows each")
        if rates:
            line += f", {min(rates):,.0f}–{max(rates):,.0f} rows/s"
        return [line + " (each worker's in workers.jsonl)"]


class _RunLog(logging.FileHandler):
    """DIR/run.log: a line that cannot be written (the disk is full) is dropped, not reported with
    logging's traceback on the terminal; the run's own error names the full disk and what is intact."""

    def handleError(self, record: logging.LogRecord) -> None:
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handleError(record)


def _open_log(args: argparse.Namespace) -> None:
    """Create the output directory and send the log to DIR/run.log as well (appended on --resume)."""
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        handler = _RunLog(args.out / "run.log", mode="a" if args.resume is not None else "w")
        if args.resume is None and (args.out / "workers.jsonl").exists():  # --force: the new run's events only
            (args.out / "workers.jsonl").unlink()
    except OSError as e:
        raise ConfigError(f"--out {args.out}: cannot write there ({e.strerror}); give a directory you can write") from e
    handler.setFormatter(logging.Formatter(_LOG_FORMAT))
    handler.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    logging.getLogger().addHandler(handler)
    _PROGRESS.addHandler(handler)  # what the terminal is told (banner, iterations, STOP, error) goes in too
    _handlers.append(handler)


def _claim_fresh_out(args: argparse.Namespace) -> None:
    """Make the new runs/STAMP folder of a run without --out, taking the next name where a run
    of the same second made it first (mkdir is the test: two processes never share one)."""
    while getattr(args, "fresh_out", False):
        try:
            args.out.mkdir(parents=True)
            return
        except FileExistsError:
            args.out = _new_run_dir()
        except OSError as e:
            raise ConfigError(f"cannot make {args.out} ({e.strerror}): give --out a directory you can write") from e


def _link_latest(out: Path) -> bool:
    """Point runs/latest at ``out`` (a new run folder under runs/); False where it cannot."""
    latest = RUNS / "latest"
    if latest.exists() and not latest.is_symlink():  # a folder of an older qsae's run: never touched
        log.warning("%s is a folder (an older run), not a link: this run is in %s", latest, out)
        return False
    tmp = RUNS / f".latest.{os.getpid()}"
    try:
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(out.name)  # relative: the runs folder can be moved or copied whole
        os.replace(tmp, latest)  # atomic: never a moment without runs/latest
    except OSError as e:
        log.warning("could not point %s at %s (%s)", latest, out, e.strerror)
        return False
    return True


def _say(line: str) -> None:
    """A line for the terminal (stdout) that run.log keeps too."""
    print(line, flush=True)
    _PROGRESS.info(line)


_PROGRESS = logging.getLogger("qsae.progress")  # to run.log only: the terminal has it from print
_PROGRESS.propagate = False
_PROGRESS.setLevel(logging.INFO)
_PROGRESS.addHandler(logging.NullHandler())  # before run.log opens: nothing (not logging's stderr fallback)


_LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
_locks: list = []  # the run folder's lock file (train.lock_run), held until master_main returns
_handlers: list[logging.Handler] = []  # what this run added to the root logger (removed at its end)


def _setup_logging(args: argparse.Namespace) -> None:
    """Console: warnings with -q, debug with -v, else info. paramiko's own INFO lines
    (connected, authenticated, ...) only with -v."""
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter(_LOG_FORMAT))
    console.setLevel(logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO)
    root.addHandler(console)
    _handlers.append(console)
    logging.getLogger("paramiko").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    for noisy in ("matplotlib", "PIL", "numba"):  # -v: font lookups, PNG chunks, compiler passes (2,000 lines)
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _make_keys(directory: str) -> int:
    from .keys import WORKER_DIR, make_keys

    d = make_keys(directory)
    w = d / WORKER_DIR
    print(f"wrote the master's keys to {d} (keep it on the master: it holds the master's secret) and the workers' "
          f"to {w}.\nCopy only {w} to every worker node, then\n"
          f"  qsae-master --wait-for N --bind 0.0.0.0 --port PORT --keys {d}\n"
          f"  qsae-worker --connect tcp://MASTER:PORT --keys {w}")
    return 0


def master_main(argv: list[str] | None = None) -> int:
    """Entry point of ``qsae-master``; returns the exit status."""
    args = build_parser().parse_args(argv)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(max(args.threads, 1)))  # before numpy loads: one core per process
    from . import _blas

    _blas.set_threads(max(args.threads, 1))  # the model's arithmetic: --threads, whatever the environment says
    _setup_logging(args)
    try:
        if args.make_keys:
            return _make_keys(args.make_keys)
        return _run(args, _explicit(argv))
    except QsaeError as e:
        notes = "".join(f"\n  {n}" for n in getattr(e, "__notes__", []))
        print(f"qsae-master: error: {e}{notes}", file=sys.stderr)
        _PROGRESS.error("qsae-master: error: %s%s", e, notes)  # run.log, where it was opened
        return 2
    except KeyboardInterrupt:
        print("qsae-master: interrupted", file=sys.stderr)
        _PROGRESS.error("qsae-master: interrupted")
        return 130
    finally:
        while _boards:
            _boards.pop().close()
        while _handlers:  # in-process callers (tests) run master_main again
            h = _handlers.pop()
            logging.getLogger().removeHandler(h)
            _PROGRESS.removeHandler(h)
            h.close()
        while _locks:  # last: the run's files are closed (and the OS would release it at exit anyway)
            _locks.pop().close()


def worker_main(argv: list[str] | None = None) -> int:
    """Entry point of ``qsae-worker``: see ``python -m qsae.worker --help``."""
    from .worker import main

    return main(argv)
