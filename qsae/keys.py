"""CURVE key directories for hand-started workers.

    qsae-master --make-keys DIR        # once: DIR/server.key(_secret), DIR/worker.key(_secret)
    # copy DIR to every node (it holds secrets: keep it private), then
    qsae-master --wait-for 4 --bind 0.0.0.0 --keys DIR
    qsae-worker --connect tcp://MASTER:PORT --keys DIR

The master admits the public keys of every ``*.key`` file in DIR except its own. Workers
started by a launcher need none of this: the master makes keys per run and hands them over
the channel that starts each worker.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import KeysError

__all__ = ["make_keys", "load_server_keys", "load_worker_keys"]


def make_keys(directory: str | os.PathLike) -> Path:
    """Create DIR with a server and a worker key pair (zmq certificate files, mode 0700)."""
    import zmq.auth

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(d, 0o700)
    for name in ("server", "worker"):
        if (d / f"{name}.key_secret").exists():
            raise KeysError(f"{d / (name + '.key_secret')} exists; remove DIR or choose another to make new keys")
        zmq.auth.create_certificates(str(d), name)
    return d


def _load(path: Path, secret: bool) -> tuple[bytes, bytes | None]:
    import zmq.auth

    if not path.exists():
        raise KeysError(f"no key file {path}: make a key directory with `qsae-master --make-keys DIR` and pass "
                        "the same DIR to the master and the workers")
    try:
        public, sec = zmq.auth.load_certificate(str(path))
    except Exception as e:
        raise KeysError(f"cannot read the key file {path} ({e}); make new keys with `qsae-master --make-keys DIR`") from e
    if secret and not sec:
        raise KeysError(f"{path} holds no secret key; pass the directory made by `qsae-master --make-keys`")
    return public, sec


def load_server_keys(directory: str | os.PathLike) -> tuple[bytes, bytes, set[bytes]]:
    """(server public, server secret, admitted client public keys) from DIR."""
    d = Path(directory)
    public, secret = _load(d / "server.key_secret", secret=True)
    clients = {_load(p, secret=False)[0] for p in sorted(d.glob("*.key")) if p.name != "server.key"}
    if not clients:
        raise KeysError(f"{d} holds no worker keys (*.key besides server.key); run `qsae-master --make-keys DIR`")
    return public, secret, clients


def load_worker_keys(directory: str | os.PathLike) -> dict:
    """The worker's CURVE settings from DIR: {"server_public", "public", "secret"} (z85 text)."""
    d = Path(directory)
    server_public, _ = _load(d / "server.key", secret=False)
    public, secret = _load(d / "worker.key_secret", secret=True)
    return {"server_public": server_public.decode(), "public": public.decode(), "secret": secret.decode()}
