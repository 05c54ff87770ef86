"""Hosts files: `[user@]host[:port] [workers=N] [python=PATH]`, one host a line."""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
from pathlib import Path
from typing import Any

from ..errors import HostsFileError


# --------------------------------------------------------------------------------------
# Hosts files
# --------------------------------------------------------------------------------------

_HOSTS_HELP = """\
hosts file: one host per line,
    [user@]host[:port] [workers=N] [python=/path/to/python]
e.g.
    alice@node1.example.org:2222 workers=4 python=/opt/qsae/venv/bin/python
    node2 workers=8
    [fe80::1]:22
'#' starts a comment, blank lines are ignored; host may be a Host alias of ~/.ssh/config."""


def format_hosts_help() -> str:
    """Return a short description of the hosts file format, for ``--help`` and errors.

    Returns
    -------
    str
        Several lines: the line format and an example.
    """
    return _HOSTS_HELP


@dataclasses.dataclass(frozen=True)
class HostSpec:
    """One line of a hosts file.

    Attributes
    ----------
    user : str or None
        Login name; None means ``~/.ssh/config``'s ``User`` or the local user name.
    host : str
        Host name, address or ``~/.ssh/config`` alias.
    port : int or None
        SSH port; None means ``~/.ssh/config``'s ``Port`` or 22.
    workers : int
        Number of worker processes on this host (>= 1).
    python : str
        The remote interpreter that has qsae installed.
    """

    user: str | None
    host: str
    port: int | None = None
    workers: int = 1
    python: str = "python3"

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        s = f"{self.user}@{host}" if self.user else host
        return f"{s}:{self.port}" if self.port is not None else s


_COMMENT = re.compile(r"(^|\s)#.*$")
_HOSTNAME = re.compile(r"^[A-Za-z0-9_.%-]+$")
_USER = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.-]*\$?$")


def _parse_port(text: str, where: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise HostsFileError(f"{where}: bad port {text!r}: expected a number from 1 to 65535")
    return int(text)


def _parse_address(token: str, where: str) -> tuple[str | None, str, int | None]:
    user = None
    if "@" in token:
        user, _, token = token.rpartition("@")
        if not _USER.match(user):
            raise HostsFileError(f"{where}: bad user name {user!r}: expected letters, digits, '.', '_' or '-'")
    port = None
    if token.startswith("["):
        host, sep, rest = token[1:].partition("]")
        if not sep or not host:
            raise HostsFileError(f"{where}: bad host {token!r}: expected [IPv6-address]:port, e.g. [fe80::1]:22")
        if rest:
            if not rest.startswith(":"):
                raise HostsFileError(f"{where}: bad host {token!r}: expected ':port' after ']'")
            port = _parse_port(rest[1:], where)
    elif token.count(":") > 1:  # a bare IPv6 address, without a port
        host = token
    else:
        host, sep, p = token.partition(":")
        if sep:
            port = _parse_port(p, where)
    if not host or (":" not in host and not _HOSTNAME.match(host)):
        raise HostsFileError(f"{where}: bad host name {host!r}: expected [user@]host[:port], e.g. alice@node1:2222")
    return user, host, port


def _parse_line(tokens: list[str], where: str) -> HostSpec:
    user, host, port = _parse_address(tokens[0], where)
    options: dict[str, Any] = {}
    for token in tokens[1:]:
        key, sep, value = token.partition("=")
        if not sep:
            raise HostsFileError(f"{where}: unexpected {token!r}: expected key=value (workers=N or python=PATH) "
                                 f"after the host")
        if key in options:
            raise HostsFileError(f"{where}: {key}= given twice: keep one")
        if key == "workers":
            if not value.isdigit() or int(value) < 1:
                raise HostsFileError(f"{where}: bad workers={value}: expected a whole number >= 1")
            options[key] = int(value)
        elif key == "python":
            if not value:
                raise HostsFileError(f"{where}: empty python=: expected the path of a Python with qsae installed")
            options[key] = value
        else:
            raise HostsFileError(f"{where}: unknown key {key!r}: expected workers=N or python=PATH")
    return HostSpec(user=user, host=host, port=port, **options)


def parse_hosts(path: str | os.PathLike[str]) -> list[HostSpec]:
    """Read a hosts file.

    Parameters
    ----------
    path : str or path-like
        The hosts file; see :func:`format_hosts_help` for its format.

    Returns
    -------
    list of HostSpec
        One per host line, in file order.

    Raises
    ------
    HostsFileError
        The file cannot be read, has no hosts, a line is malformed (the message names the
        file, the line number, the line and what was expected) or a host is listed twice.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise HostsFileError(f"cannot read hosts file {path}: {e.strerror or e}: check the path") from e
    except UnicodeDecodeError as e:
        raise HostsFileError(f"hosts file {path} is not UTF-8 text: {e}") from e
    hosts: list[HostSpec] = []
    seen: dict[tuple[str, int | None], int] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = _COMMENT.sub("", raw).strip()
        if not line:
            continue
        where = f"{path}, line {lineno}: {raw.strip()!r}"
        try:
            tokens = shlex.split(line)
        except ValueError as e:
            raise HostsFileError(f"{where}: {e}: close the quote") from None
        spec = _parse_line(tokens, where)
        key = (spec.host, spec.port)
        if key in seen:
            raise HostsFileError(f"{where}: host {spec} is already listed on line {seen[key]}: "
                                 f"use one line with workers=N")
        seen[key] = lineno
        hosts.append(spec)
    if not hosts:
        raise HostsFileError(f"hosts file {path} lists no hosts: add lines like 'user@host workers=4'\n"
                             + format_hosts_help())
    return hosts


