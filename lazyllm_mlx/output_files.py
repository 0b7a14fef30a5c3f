"""Writing a user's output file: whole or not at all, and never over something that is not a file.

Every command that writes a file the user named goes through `write_atomically`: the new contents
go to a temporary file beside the target, which then replaces the target in one rename. Only a
regular file, or a name that does not exist yet, is ever replaced; a device, a FIFO, a socket or a
directory is refused with one line. A symlink is followed, as `cp` and shells do: the file it
points to is replaced and the link stays a link.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


class NotARegularFile(OSError):
    """The output path names a directory, device, FIFO or socket: it is never replaced."""


_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
)


def output_target(path: str | Path) -> Path:
    """The regular file `path` names (a symlink followed), or a new name in an existing folder.
    Raises a one-line OSError for anything else."""
    given = Path(path).expanduser()
    target = Path(os.path.realpath(given))
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as error:
        raise OSError(f"cannot write {given}: {error.strerror or error}") from None
    if mode is not None and not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
        raise NotARegularFile(f"{given} is {kind}, not a regular file: refusing to replace it")
    if not target.parent.is_dir():
        raise FileNotFoundError(f"cannot write {given}: no folder {target.parent}")
    return target


def check_writable(path: str | Path) -> Path:
    """`output_target`, plus a trial file made and removed beside it: a long run learns at its
    start, not at its end, that its output cannot be written."""
    target = output_target(path)
    try:
        fd, trial = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".check")
        os.close(fd)
        os.unlink(trial)
    except OSError as error:
        raise OSError(f"cannot write {path}: {error.strerror or error}") from None
    return target


def write_atomically(
    path: str | Path, write: Callable[[str], None], suffix: str = ".partial"
) -> Path:
    """Call `write(temporary_path)`, then put that file in place of `path` in one rename.
    On any failure the target is left as it was and the temporary file is removed. `suffix`
    ends the temporary name, for writers that insist on an extension."""
    target = output_target(path)
    tmp = None
    try:  # errors name the file asked for, not the temporary one beside it
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=suffix)
        os.close(fd)
        write(tmp)
        os.chmod(tmp, _mode_for(target))
        output_target(path)  # the target may have changed kind while we wrote
        os.replace(tmp, target)
        tmp = None
    except NotARegularFile:
        raise
    except (OSError, RuntimeError) as error:
        raise OSError(f"cannot write {path}: {getattr(error, 'strerror', None) or error}") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return target


def write_text(path: str | Path, text: str) -> Path:
    """Replace `path` by `text` (UTF-8) whole."""
    return write_atomically(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path: str | Path, value: Any, indent: int = 1) -> Path:
    """Replace `path` by `value` as JSON, whole: a reader never sees half a report."""
    return write_text(path, json.dumps(value, indent=indent))


def _mode_for(target: Path) -> int:
    """An existing file keeps its permissions; a new one gets the umask's (mkstemp makes 0600)."""
    try:
        return stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask
