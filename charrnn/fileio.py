"""Files that survive a crash: atomic writes, their temporary files, process ids.

A file is written to `.<name>.<pid>.tmp` in the same directory, fsynced, then renamed over
`<name>`: readers see the old file or the new one, whole, never a half-written one. A
process killed mid-write (SIGKILL, power loss) leaves its temporary file behind; the
temporary name never matches what readers look for, and `remove_stale_temps` clears it
the next time the directory is used.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

from .errors import RunDirError

_TEMP = re.compile(r"^\..+\.(\d+)\.tmp$")


def temp_path(path: Path) -> Path:
    """Where `path` is written before it is renamed into place: `.<name>.<pid>.tmp`."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def remove_stale_temps(directory: Path, dead_only: bool = True) -> list[Path]:
    """Deletes the temporary files that other processes left in `directory`: those of dead
    processes, or (dead_only=False, for a caller that holds the directory's lock) all but
    our own. Returns what was removed; errors are ignored (the files are harmless)."""
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP.match(entry.name)
        if not m or not entry.is_file(follow_symlinks=False):
            continue
        pid = int(m.group(1))
        if pid == os.getpid() or (dead_only and pid_alive(pid)):
            continue
        try:
            os.unlink(entry.path)
            removed.append(Path(entry.path))
        except OSError:
            pass
    return removed


def fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(
    path: Path, data: bytes, patch: Callable[[], tuple[int, bytes]] | None = None
) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, whole.

    `patch`, called once `data` is written, returns (offset, bytes) to write over `data`
    there before the fsync: a checksum that was computed while `data` was written.
    Any OSError (full disk, no permission, ...) becomes a one-line RunDirError naming the
    file, with the temporary file removed and the old `path` untouched."""
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if patch is not None:
                offset, piece = patch()
                f.seek(offset)
                f.write(piece)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise RunDirError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)


def check_writable(path: Path) -> None:
    """Refuses, before any work, an output file that cannot be written: a directory, or a
    folder that is missing or not writable (RunDirError, one line)."""
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise RunDirError(f"cannot write {path}: it is a directory")
    if not parent.is_dir():
        raise RunDirError(f"cannot write {path}: no such directory {parent}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RunDirError(f"cannot write {path}: the directory {parent} is not writable")
