"""Safe file handling for everything that arrives from outside: atomic writes, paths that stay inside
their folder, bounded reads.

Run folders, export folders and registry stores are shared between people and machines, so a file in
them is untrusted input: a name from metadata must never escape its folder, a write must never leave a
half-written file behind, and a read must never take more memory than the caller allowed.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

from .errors import DataError


def write_atomic(path: str | Path, data: bytes | str, *, encoding: str = "utf-8") -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the new one, never a part.

    The temporary name is unique per process and call (``.NAME.<pid>.<random>.tmp`` beside the target),
    the bytes are flushed and fsynced before the rename, and the folder is fsynced after it, so a crash
    or a kill at any point leaves either the old file or the new one (and at worst a stray temp file).
    """
    path = Path(path)
    payload = data.encode(encoding) if isinstance(data, str) else data
    temp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(temp, "xb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: str | Path) -> None:
    """Make a rename inside ``folder`` durable (a no-op where folders cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def inside(folder: str | Path, name: str, what: str = "file") -> Path:
    """``folder / name`` when ``name`` is one plain file name that stays inside ``folder``.

    Refuses empty names, path separators, ``.``/``..``, absolute paths, NUL bytes and symbolic links that
    resolve outside ``folder``: a name read from metadata can then never address another file.
    """
    folder = Path(folder)
    plain = (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and "\x00" not in name
        and not Path(name).is_absolute()
    )
    if not plain:
        raise DataError(f"{folder}: {what} name {name!r} is not a plain file name inside the folder")
    path = folder / name
    if path.is_symlink() or path.exists():
        real, base = path.resolve(), folder.resolve()
        if not real.is_relative_to(base) or real == base:
            raise DataError(f"{folder}: {what} {name!r} points outside the folder ({real}); refusing it")
    return path


def read_bounded(path: str | Path, limit: int, what: str = "file") -> bytes:
    """The bytes of ``path``, refusing a file larger than ``limit`` bytes before reading it."""
    path = Path(path)
    size = path.stat().st_size
    if size > limit:
        raise DataError(f"{path}: {what} is {size:,} bytes, over the limit of {limit:,}")
    with open(path, "rb") as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:  # grew while we read it
        raise DataError(f"{path}: {what} is over the limit of {limit:,} bytes")
    return data


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (used to sweep what killed ones left)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
