"""The error policy shared by every command (``damo-jax train|eval|predict|export|show|info``).

A *user error* is anything the user can fix: a bad config name, key or value, a missing path, an
impossible size, an unsafe or corrupt checkpoint, a dataset error. Library code raises
:class:`UserError` (or one of the subclasses below, or one of the registered foreign types such as
``DataError`` / ``PthFormatError`` / ``UnsafeCheckpointError``) with a message that names the flag,
file and field. The CLI layer (``damo_jax.cli``) prints it as ONE line, ``error: <message>``, and
exits with code 2; ``--debug`` or ``DAMO_JAX_DEBUG=1`` shows the traceback instead. Anything else is
an internal error and keeps its traceback.
"""
from __future__ import annotations

import os

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A mistake the user can fix; the message is the whole story (file, flag, field, reason)."""


class ConfigError(UserError, ValueError):
    """Bad config name, override key or value (names the key and the config file)."""


class InputPathError(UserError, FileNotFoundError):
    """A path given on the command line or in a config does not exist / is not what is expected."""


class OutputWriteError(UserError, OSError):
    """An output file could not be written (disk full, no permission, a read-only file system):
    names the file and the system's reason."""


def write_failed(path, err: BaseException) -> OutputWriteError:
    """The :class:`OutputWriteError` for a failed write of ``path`` (raise it ``from err``); the
    reason is the OS error's text (``No space left on device (errno 28)``), else the error's first
    line (OpenVINO reports failed writes as ``RuntimeError``)."""
    if isinstance(err, OSError) and err.strerror:
        reason = f"{err.strerror} (errno {err.errno})"
    else:
        import re
        reason = re.sub(r"^Check '[^']*' failed at \S+: ", "", one_line(err))[:300]
    return OutputWriteError(f"cannot write {path}: {reason}")


class ConfigKeyError(ConfigError, KeyError):
    """An override names a config key that does not exist (also a ``KeyError`` for callers)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def is_url(text) -> bool:
    """``scheme://…`` (``gs://b/run``, ``https://host/img.jpg``): never a local path here."""
    import re
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", str(text)) is not None


def refuse_url(path, flag: str) -> None:
    """A :class:`ConfigError` for an output named by a URL (``gs://bucket/run``, ``s3://…``):
    outputs go through the local file system, where ``gs://b/run`` would silently become a local
    folder ``gs:/b/run``. ``flag`` names the option (``--workdir``) or the argument."""
    if is_url(path):
        raise ConfigError(f"{flag} {path}: a URL; outputs are written to local paths only (mount "
                          f"the bucket with Cloud Storage FUSE (gcsfuse), or use a Drive folder on "
                          f"Colab)")


def is_probability(value) -> bool:
    """True for a finite real number in [0, 1] (not a bool): the rule for every score / IoU
    threshold, whether it comes from a config (``test.conf_thre``) or a flag (``--conf``)."""
    import math
    import numbers
    return (isinstance(value, numbers.Real) and not isinstance(value, bool)
            and math.isfinite(float(value)) and 0.0 <= float(value) <= 1.0)


def is_count(value, low: int = 1) -> bool:
    """True for an integer (not a bool) >= ``low``: batch sizes, detection caps, step counts."""
    import numbers
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and int(value) >= low


def one_line(err: BaseException) -> str:
    """The message of ``err`` as one line (newlines folded), for the ``error: ...`` output."""
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    text = " ".join(part.strip() for part in text.splitlines() if part.strip())
    return text or type(err).__name__


def user_error_types() -> tuple[type, ...]:
    """Every exception type treated as a user error: :class:`UserError` and the domain errors of
    the data pipeline and the torch-free checkpoint reader (imported lazily: no jax at import)."""
    types: list[type] = [UserError]
    try:
        from damo_jax.data_pipelines.records import DataError
        types.append(DataError)
    except ImportError:  # pragma: no cover
        pass
    try:
        from damo_jax.interop.pth_io import PthFormatError, UnsafeCheckpointError
        types += [PthFormatError, UnsafeCheckpointError]
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


def debug_enabled(argv=None) -> bool:
    """``--debug`` on the command line or ``DAMO_JAX_DEBUG=1`` in the environment."""
    return bool(os.environ.get("DAMO_JAX_DEBUG")) or bool(argv and "--debug" in argv)
