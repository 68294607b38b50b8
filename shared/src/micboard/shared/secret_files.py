"""Files that hold secrets (NKey seeds, credentials, keys, ``.env``): permission checks and safe writes.

A seed that other local users can read is a stolen identity, so a world-readable (or
world-writable) secret file is refused outright; a group-readable one is allowed with a warning,
because some deployments share a service group on purpose.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import stat
import tempfile
from pathlib import Path

from micboard.shared.errors import ConfigError

log = logging.getLogger(__name__)

#: Mode of every secret file micboard writes.
SECRET_FILE_MODE = 0o600
#: Mode of the directories micboard creates for secret files.
SECRET_DIR_MODE = 0o700

# Lines of a config file that hold a secret: a key naming one with a non-empty value, an NKey
# seed, or a URL with a password in it. Used to decide whether a config file needs the checks.
_SECRET_LINE = re.compile(
    r"""(?imx)
    ^\s*[A-Z0-9_.-]*(PASSWORD|PASSWD|SECRET|TOKEN|SEED|API_?KEY|PRIVATE_?KEY)[A-Z0-9_]*\s*[=:]\s*["']?[^\s"'#]
    | \bS[A-Z][A-Z2-7]{56}\b
    | \w+://[^/\s:@]+:[^/\s@]+@
    """
)


def check_secret_file(path: Path, *, what: str = "secret file") -> None:
    """Raise :class:`ConfigError` if ``path`` is missing or world-accessible; warn if group-readable."""
    try:
        info = path.stat()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"{what} {path} is not a regular file")
    if os.name == "nt":  # pragma: no cover - POSIX modes mean nothing there
        return
    mode = stat.S_IMODE(info.st_mode)
    if mode & (stat.S_IROTH | stat.S_IWOTH):
        raise ConfigError(
            f"{what} {path} is accessible to every user (mode {mode:04o}); run: chmod 600 {path}"
        )
    if mode & (stat.S_IRGRP | stat.S_IWGRP):
        log.warning(
            "secret file is group-accessible",
            extra={"what": what, "path": str(path), "mode": f"{mode:04o}", "fix": f"chmod 600 {path}"},
        )


def holds_secrets(text: str) -> bool:
    """Whether ``text`` (a config file's content) appears to contain a secret value."""
    return _SECRET_LINE.search(text) is not None


def check_config_file(path: Path, *, what: str = "config file") -> None:
    """Apply :func:`check_secret_file` to ``path`` when it holds secrets; a missing file is not checked.

    Config files without secrets (only paths to seed files, say) may be world-readable.
    """
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None
    if holds_secrets(text):
        check_secret_file(path, what=f"{what} holding secrets")


def write_secret_file(path: Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` atomically with mode 0600, creating missing parents with mode 0700.

    The file is created with its final mode (never briefly readable by others) and renamed into
    place, so a crash leaves either the old content or the new one.
    """
    payload = data.encode() if isinstance(data, str) else data
    parent = path.parent
    if not parent.exists():
        parent.mkdir(mode=SECRET_DIR_MODE, parents=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=parent)  # mkstemp creates 0600
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.chmod(SECRET_FILE_MODE)
        tmp.replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
