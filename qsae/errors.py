"""Every exception qsae raises on purpose.

The tree::

    QsaeError                       base of everything below
    ├── ConfigError (ValueError)    a setting or option that cannot work
    ├── DataError (ValueError)      input data that cannot be used (file, shape, NaN, ...)
    │   └── DataTypeError (TypeError)    values that are not numbers (a dict, a string, complex)
    ├── ProtocolError               a message that breaks the wire protocol
    ├── NumericalError              NaN or Inf where a finite number is required
    ├── WorkerError                 a worker reported a failure (host, exception, traceback)
    ├── WorkerLost                  workers died or went silent and none are left to cover
    ├── RoundTimeout (TimeoutError) a round, HELLO or reply did not arrive in time
    ├── LaunchError                 workers could not be started (local or SSH)
    │   └── HostsFileError (ValueError)  a malformed hosts file line
    ├── KeysError                   CURVE keys missing or unreadable
    ├── OutputError (OSError)       a run's files could not be written (disk full, ...)
    ├── RunLocked                   another process is writing the run folder
    └── MissingDependency (ImportError)  an optional package is not installed

    QsaeWarning (UserWarning)       base of every warning qsae gives
    └── SaturationWarning           most hidden units saturated: inputs far outside [0, 1]

Each message says what happened and how to fix it.
"""

from __future__ import annotations

__all__ = [
    "QsaeError",
    "ConfigError",
    "DataError",
    "DataTypeError",
    "ProtocolError",
    "NumericalError",
    "WorkerError",
    "WorkerLost",
    "RoundTimeout",
    "LaunchError",
    "HostsFileError",
    "KeysError",
    "OutputError",
    "RunLocked",
    "MissingDependency",
    "QsaeWarning",
    "SaturationWarning",
]


class QsaeError(Exception):
    """Base class of every error qsae raises on purpose."""


class ConfigError(QsaeError, ValueError):
    """A setting or command-line option that cannot work."""


class DataError(QsaeError, ValueError):
    """Input data that cannot be used: a missing file, a bad shape, NaN or Inf."""


class DataTypeError(DataError, TypeError):
    """Input values that are not numbers (a dict in X, a string, complex): a TypeError too, as numpy's."""


class ProtocolError(QsaeError):
    """A message that breaks the wire protocol (bad header, frames, dtype or shape)."""


class NumericalError(QsaeError, FloatingPointError):
    """NaN or Inf where a finite number is required."""


class WorkerError(QsaeError):
    """A worker reported a failure; the message carries its host, exception and traceback."""


class WorkerLost(QsaeError):
    """Workers died or went silent and no living worker is left to cover their data."""


class RoundTimeout(QsaeError, TimeoutError):
    """Something expected (a round's replies, a HELLO) did not arrive before its deadline."""


class LaunchError(QsaeError):
    """Workers could not be started, locally or over SSH."""


class HostsFileError(LaunchError, ValueError):
    """A hosts file line that does not follow `[user@]host[:port] [workers=N] [python=PATH]`."""


class KeysError(QsaeError):
    """CURVE keys are missing or unreadable."""


class OutputError(QsaeError, OSError):
    """A run's files could not be written (disk full, permissions); the message says what is intact."""


class RunLocked(QsaeError):
    """Another process holds the run folder's lock; the message names it (pid, host, start)."""


class MissingDependency(QsaeError, ImportError):
    """An optional package is not installed; the message names the pip command."""


class QsaeWarning(UserWarning):
    """Base class of every warning qsae gives."""


class SaturationWarning(QsaeWarning):
    """Most hidden units ended saturated (σ at 0 or 1): the inputs are far outside [0, 1]."""
