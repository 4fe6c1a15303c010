"""Writing files so that a failure or a planted link never leaves damage behind.

Everything m3mlx writes goes to a temporary name next to its destination, created exclusively
(O_EXCL | O_NOFOLLOW: never through a symbolic link someone left there), and is renamed over the
destination once complete. rename() replaces a link at the destination rather than writing
through it, and a failed write removes its temporary file.
"""

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator, Union

PARTIAL = ".partial"  # suffix of a file being written

_EXCLUSIVE = os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def temp_name(path: Path) -> Path:
    return path.with_name(path.name + PARTIAL)


def create_exclusive(path: Union[str, os.PathLike], flags: int = os.O_WRONLY) -> int:
    """A new file at `path`, opened with `flags`; returns its descriptor.

    Whatever was at `path` (a stale temporary file, a link) is removed first: unlink removes a
    link, not its target. If something appears there again before the file is created, the
    call fails (FileExistsError) rather than follow it."""
    path = Path(path)
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    return os.open(path, flags | _EXCLUSIVE, 0o644)


@contextmanager
def atomic_file(path: Union[str, os.PathLike]) -> Iterator[BinaryIO]:
    """A binary file object whose contents replace `path` when the block ends without error;
    on any error (KeyboardInterrupt included) the temporary file is removed and `path` stays
    as it was."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        f = os.fdopen(create_exclusive(tmp), "wb")
    except OSError as e:  # name the file the caller asked for, not its temporary name
        e.filename = str(path)
        raise
    try:
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: Union[str, os.PathLike], data: Union[str, bytes]):
    """Replace `path` with `data` (text is written as UTF-8)."""
    with atomic_file(path) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)


def atomic_copy(source: Union[str, os.PathLike], path: Union[str, os.PathLike]):
    """Replace `path` with a copy of the regular file `source`."""
    with open(source, "rb") as src, atomic_file(path) as dst:
        shutil.copyfileobj(src, dst, 1 << 20)


def is_regular_file(path: Path) -> bool:
    """A regular file at `path` itself: not a link, a directory, a FIFO or a device."""
    try:
        return path.is_file() and not path.is_symlink()
    except OSError:
        return False
