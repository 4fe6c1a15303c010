"""Writing files so that a failure or a planted link never leaves damage behind, and opening
the files a checkpoint supplies so that one that is not a file cannot hang or flood a reader.

Everything m3mlx writes goes to a temporary name next to its destination, created exclusively
(O_EXCL | O_NOFOLLOW: never through a symbolic link someone left there), and is renamed over the
destination once complete. rename() replaces a link at the destination rather than writing
through it, and a failed write removes its temporary file.
"""

import errno
import os
import shutil
import stat
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
def staged_file(path: Union[str, os.PathLike]) -> Iterator[BinaryIO]:
    """A binary file object for `path`'s temporary name (`temp_name`), complete on the disk
    when the block ends without error, for the caller to rename over `path` (`atomic_file`
    does so at once; files that must appear together are renamed once all are written). On
    any error (KeyboardInterrupt included) the temporary file is removed."""
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
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_file(path: Union[str, os.PathLike]) -> Iterator[BinaryIO]:
    """A binary file object whose contents replace `path` when the block ends without error;
    on any error (KeyboardInterrupt included) the temporary file is removed and `path` stays
    as it was."""
    path = Path(path)
    with staged_file(path) as f:
        yield f
    try:
        os.replace(temp_name(path), path)
    except BaseException:
        temp_name(path).unlink(missing_ok=True)
        raise


def atomic_write(path: Union[str, os.PathLike], data: Union[str, bytes]):
    """Replace `path` with `data` (text is written as UTF-8)."""
    with atomic_file(path) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)


def atomic_copy(source: Union[str, os.PathLike], path: Union[str, os.PathLike]):
    """Replace `path` with a copy of the regular file `source`."""
    with open(source, "rb") as src, atomic_file(path) as dst:
        shutil.copyfileobj(src, dst, 1 << 20)


def open_regular(path: Union[str, os.PathLike]) -> BinaryIO:
    """`path` opened for reading, refused (OSError) unless it is a regular file. Links are
    followed, since a Hub snapshot is made of them, but where they lead must be a file: opening
    a FIFO blocks until something writes to it, and a device like /dev/zero never ends."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "it is not a regular file but a FIFO, a device or a "
                          "directory; put the real file there", str(path))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise


def is_regular_file(path: Path) -> bool:
    """A regular file at `path` itself: not a link, a directory, a FIFO or a device."""
    try:
        return path.is_file() and not path.is_symlink()
    except OSError:
        return False
