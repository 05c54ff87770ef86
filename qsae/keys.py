"""CURVE key directories for hand-started workers.

    qsae-master --make-keys DIR        # once: the master's keys in DIR, the workers' in DIR/worker
    # copy DIR/worker (never DIR: it holds the master's secret) to every node, then
    qsae-master --wait-for 4 --bind 0.0.0.0 --keys DIR
    qsae-worker --connect tcp://MASTER:PORT --keys DIR/worker

DIR holds ``server.key`` and ``server.key_secret``; DIR/worker holds a copy of
``server.key`` (the master's public key, which a worker needs to connect) and the worker key
pair ``worker.key`` / ``worker.key_secret``. The master admits the public keys of every
``*.key`` file in DIR/worker (and, for directories made before DIR/worker existed, in DIR)
except its own. Secret files are 0600, the directories 0700.

Workers started by a launcher need none of this: the master makes keys per run and hands
them over the channel that starts each worker.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .errors import KeysError

__all__ = ["make_keys", "load_server_keys", "load_worker_keys", "WORKER_DIR"]

WORKER_DIR = "worker"  # the sub-directory that goes to the nodes


def _private_dir(d: Path) -> None:
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(d, 0o700)  # mkdir's mode is masked by the umask


def make_keys(directory: str | os.PathLike) -> Path:
    """Write the master's key pair into DIR and what a worker needs into DIR/worker.

    Parameters
    ----------
    directory : where the keys go; created (mode 0700) if missing. Existing keys are never
        overwritten.

    Returns
    -------
    DIR. Copy only DIR/worker to the worker nodes.
    """
    import zmq.auth

    d = Path(directory)
    w = d / WORKER_DIR
    for f in (d / "server.key_secret", w / "worker.key_secret", d / "worker.key_secret"):
        if f.exists():
            raise KeysError(f"{f} exists: keys are never overwritten; remove {d} or choose another DIR")
    mask = os.umask(0o077)  # no moment when a secret is readable by others
    try:
        _private_dir(d)
        _private_dir(w)
        zmq.auth.create_certificates(str(d), "server")
        zmq.auth.create_certificates(str(w), "worker")
        shutil.copyfile(d / "server.key", w / "server.key")  # the public key only: workers need it to connect
    finally:
        os.umask(mask)
    for f in (d / "server.key_secret", w / "worker.key_secret"):
        os.chmod(f, 0o600)
    for f in (d / "server.key", w / "server.key", w / "worker.key"):
        os.chmod(f, 0o644)
    return d


def _load(path: Path, secret: bool) -> tuple[bytes, bytes | None]:
    import zmq.auth

    if not path.exists():
        raise KeysError(f"no key file {path}: make keys with `qsae-master --make-keys DIR`, then pass --keys DIR to "
                        f"the master and --keys DIR/{WORKER_DIR} to each qsae-worker")
    try:
        public, sec = zmq.auth.load_certificate(str(path))
    except Exception as e:
        raise KeysError(f"cannot read the key file {path} ({e}); make new keys with `qsae-master --make-keys DIR`") from e
    if secret and not sec:
        raise KeysError(f"{path} holds no secret key; pass the directory made by `qsae-master --make-keys`")
    return public, sec


def load_server_keys(directory: str | os.PathLike) -> tuple[bytes, bytes, set[bytes]]:
    """(server public, server secret, admitted client public keys) from DIR.

    The admitted keys are those of every ``*.key`` in DIR/worker and DIR except ``server.key``.
    """
    d = Path(directory)
    if not (d / "server.key_secret").exists() and (d.name == WORKER_DIR or (d / "worker.key_secret").exists()):
        raise KeysError(f"{d} is a worker's key directory (it has no server.key_secret): give the master the "
                        f"directory made by `qsae-master --make-keys DIR`, and DIR/{WORKER_DIR} to the workers")
    public, secret = _load(d / "server.key_secret", secret=True)
    files = sorted((d / WORKER_DIR).glob("*.key")) + sorted(d.glob("*.key"))
    clients = {_load(p, secret=False)[0] for p in files if p.name != "server.key"}
    if not clients:
        raise KeysError(f"{d} holds no worker keys ({WORKER_DIR}/*.key besides server.key); "
                        f"run `qsae-master --make-keys DIR`")
    return public, secret, clients


def load_worker_keys(directory: str | os.PathLike) -> dict:
    """The worker's CURVE settings from DIR: {"server_public", "public", "secret"} (z85 text).

    DIR is the DIR/worker folder made by ``make_keys``; the master's DIR also works (its
    worker sub-folder is used), though a node should never hold the master's secret.
    """
    d = Path(directory)
    if not (d / "worker.key_secret").exists() and (d / WORKER_DIR / "worker.key_secret").exists():
        d = d / WORKER_DIR
    server_public, _ = _load(d / "server.key", secret=False)
    public, secret = _load(d / "worker.key_secret", secret=True)
    return {"server_public": server_public.decode(), "public": public.decode(), "secret": secret.decode()}
