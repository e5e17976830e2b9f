"""Writing outputs whole or not at all, and never over what peftfx did not write.

Every file or folder peftfx writes (``save_adapter``, ``export_onnx``, ``peftfx compile --output``, ``peftfx
merge``) is staged beside its destination, flushed to the disk (``fsync``: after a power cut, a renamed file that
was never written is a file of zeros under its final name) and put in place by renames: a file in one
``os.replace``; a folder by exchanging it with the old one in one step where Linux can (``renameat2``'s
``RENAME_EXCHANGE``), else by renaming the old one aside, the new one in, then deleting the old one, and renaming
the old one back if the second rename fails. A failure at any step leaves the previous output whole and no
temporary behind. ``check_destination`` refuses a destination that cannot be written (under a regular file, a
folder where a file goes and the reverse) before any expensive work starts.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import functools
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

from .errors import PeftfxError

MARKER = "peftfx-output.json"


def check_destination(path: str | Path, kind: Literal["file", "folder"], where: str) -> Path:
    """``path``, refused (naming ``where``) when a ``kind`` cannot be written there: call before the work."""
    path = Path(path)
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise PeftfxError(f"{where}: {parent} is a file, so nothing can be written under it")
            break
    if kind == "file" and path.is_dir():
        raise PeftfxError(f"{where}: {path} is a folder; give a file name")
    if kind == "folder" and path.exists() and not path.is_dir():
        raise PeftfxError(f"{where}: {path} is a file, not a folder")
    return path


@contextlib.contextmanager
def replaced_file(path: str | Path, *, durable: bool = True) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; it becomes ``path`` in one step, only if the block succeeds.

    ``durable=False`` skips the flush to the disk (a cache's file, which a reader checks and may lose)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        yield Path(name)
        _as_if_created(Path(name), 0o666)
        if durable:
            _sync(Path(name))
        os.replace(name, path)
        if durable:
            _sync(path.parent)
    finally:
        Path(name).unlink(missing_ok=True)


@contextlib.contextmanager
def replaced_folder(path: str | Path) -> Iterator[Path]:
    """An empty folder beside ``path`` to fill; it replaces ``path`` (if any) only if the block succeeds.

    The caller decides whether ``path`` may be replaced (``owned_output``, ``save_adapter``'s own check).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    holder = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    staged, old = holder / "new", holder / "old"
    stranded = False  # the previous folder could be neither replaced nor put back: it stays where it is, named
    try:
        staged.mkdir()
        yield staged
        _as_if_created(staged, 0o777)
        sync_tree(staged)
        if path.is_dir() and _exchange(staged, path):
            _sync(path.parent)
            return
        if path.exists():
            os.replace(path, old)
        try:
            os.replace(staged, path)
            _sync(path.parent)
        except BaseException:
            if old.exists():
                try:
                    os.replace(old, path)
                except OSError as e:
                    stranded = True
                    shutil.rmtree(staged, ignore_errors=True)
                    raise OSError(f"{path} could not be replaced nor put back; the previous one is at {old}") from e
            raise
    finally:
        if not stranded:
            shutil.rmtree(holder, ignore_errors=True)


def sync_tree(folder: Path) -> None:
    """Flush every file below ``folder``, then each folder's entries, to the disk."""
    for parent, _, files in os.walk(folder):
        for name in files:
            _sync(Path(parent) / name)
        _sync(Path(parent))


def start_writeback(fd: int, offset: int, size: int) -> None:
    """Start writing a range just written to the disk, without waiting (Linux's ``sync_file_range``; elsewhere
    nothing): the final flush then finds it written, so a long job's disk writes run beside its computing instead
    of all at its end (the kernel starts on its own only past a tenth or so of the memory dirty)."""
    call = _sync_file_range()
    if call is not None and size > 0:
        call(fd, offset, size, _SYNC_FILE_RANGE_WRITE)  # best effort: an error here surfaces at the final fsync


_SYNC_FILE_RANGE_WRITE = 2


@functools.cache
def _sync_file_range() -> Callable[..., int] | None:
    libc = _libc()
    call = getattr(libc, "sync_file_range", None) if libc is not None else None
    if call is not None:
        call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return call


def _sync(path: Path) -> None:
    """Flush a file's data, or a folder's entries (a rename), to the disk; folders cannot be opened on Windows."""
    if path.is_dir() and os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two folders in one step (Linux 3.15+, glibc 2.28+); False where that is not available, nothing done."""
    libc = _libc()
    renameat2 = getattr(libc, "renameat2", None) if libc is not None else None
    if renameat2 is None:
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EXDEV, 0):
        return False  # the kernel or filesystem cannot: the two-rename path does it
    raise OSError(error, f"{b} could not be replaced: {os.strerror(error)}")


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c") if os.name == "posix" else None
    return ctypes.CDLL(name, use_errno=True) if name else None


def write_marker(folder: Path, version: str) -> None:
    """Sign an output folder: peftfx's name and version, and the files it wrote (so it may replace them later)."""
    files = sorted(p.name for p in folder.iterdir())
    text = json.dumps({"written_by": "peftfx", "version": version, "files": files}, indent=2) + "\n"
    (folder / MARKER).write_text(text)


def check_owned(folder: Path, where: str) -> None:
    """Refuse to replace a folder peftfx cannot prove it wrote: it must be empty or hold exactly what its marker
    lists, so a folder of the user's (or another tool's output that happens to share a file name) is never lost."""
    if not folder.is_dir() or not any(folder.iterdir()):
        return
    refusal = f"{where}: {folder} exists and is not a folder peftfx wrote"
    try:
        listed = json.loads((folder / MARKER).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        raise PeftfxError(f"{refusal} (no readable {MARKER}); remove it or pick another") from None
    extra = sorted({p.name for p in folder.iterdir()} - {MARKER, *map(str, listed)})
    if extra:
        raise PeftfxError(f"{refusal}: it also holds {', '.join(extra)}; remove them or pick another")


def _as_if_created(path: Path, mode: int) -> None:
    """Temporary files and folders are private (0600, 0700); what they become gets the mode ``open`` would give."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(mode & ~umask)
