"""The one error boundary of the `m3mlx` command: every subcommand runs inside it.

Expected failures (bad input of any kind: every exception class m3mlx defines, file-system
errors, out of memory, text that is not UTF-8) become one line on stderr and exit status 1.
Ctrl-C exits with 130 at any point of a command, model loading included. Anything else is a
bug: a short message saying where to report it, exit status 70, and the traceback only with
M3MLX_DEBUG=1.
The interactive chat uses the same rules for each line it handles, and stays open.
"""

import errno
import os
import sys
from contextlib import contextmanager
from typing import Optional

import click

DEBUG_ENV = "M3MLX_DEBUG"
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C
EXIT_BUG = 70  # EX_SOFTWARE

_OS_ADVICE = {
    errno.ENOSPC: "the disk is full: free some space and run the command again",
    errno.EDQUOT: "the disk quota is exceeded: free some space and run the command again",
    errno.EACCES: "permission denied: use a location you may read or write",
    errno.EPERM: "permission denied: use a location you may read or write",
    errno.EROFS: "it is on a read-only file system: write somewhere else",
    errno.ENOENT: "no such file or directory",
}


def is_expected(e: BaseException) -> bool:
    """A failure of the input or the environment, not of m3mlx: it gets a one-line message."""
    if isinstance(e, (OSError, MemoryError, UnicodeError)):
        return True
    return any(cls.__module__.split(".")[0] == "m3mlx" for cls in type(e).__mro__)


def one_line(e: BaseException) -> str:
    """The message of an expected failure on one line."""
    if isinstance(e, OSError) and e.errno is not None:
        where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
        advice = _OS_ADVICE.get(e.errno) or e.strerror or str(e)
        return f"{where}: {advice}" if where else advice
    if isinstance(e, MemoryError):
        return ("out of memory: try a smaller model or quantization, a shorter prompt or "
                "--index-bits 8")
    if isinstance(e, UnicodeDecodeError):
        return (f"input that is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                f"{e.start}); convert it to UTF-8 first, e.g. with iconv")
    if isinstance(e, UnicodeEncodeError):
        return "text that is not valid UTF-8; convert it to UTF-8 first, e.g. with iconv"
    return " ".join(str(e).split()) or type(e).__name__


def issue_tracker() -> str:
    """Where to report bugs: the package's "Issues" project URL when it declares one."""
    from importlib.metadata import PackageNotFoundError, metadata

    try:
        urls = metadata("m3mlx").get_all("Project-URL") or []
    except PackageNotFoundError:
        urls = []
    for entry in urls:
        label, _, url = entry.partition(",")
        if label.strip().lower() in ("issues", "bug tracker", "tracker"):
            return url.strip()
    return "the m3mlx issue tracker"


def bug_message(e: BaseException) -> str:
    return (f"internal error ({type(e).__name__}: {one_line(e)}). This is a bug in m3mlx: "
            f"please report it to {issue_tracker()} with the command you ran; run it again "
            f"with {DEBUG_ENV}=1 to see the traceback")


def debugging() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def describe(e: BaseException) -> Optional[str]:
    """The one line to show for `e`, or None for errors that must propagate (click's own, and
    everything when debugging)."""
    if isinstance(e, (click.exceptions.Exit, click.Abort, click.ClickException)):
        return None
    if isinstance(e, OSError) and e.errno == errno.EPIPE:
        return None  # stdout closed (`| head`): click exits quietly
    if debugging() and not isinstance(e, KeyboardInterrupt):
        return None
    if isinstance(e, KeyboardInterrupt):
        return "interrupted"
    return one_line(e) if is_expected(e) else bug_message(e)


def _rank_prefix() -> str:
    """'rank R of N: ' when this process is one rank of a sharded run, so that the failing
    rank is named (m3mlx.distributed is only loaded by commands that can run sharded)."""
    distributed = sys.modules.get("m3mlx.distributed")
    return distributed.rank_prefix() if distributed else ""


@contextmanager
def error_boundary():
    """Turn every failure inside into a one-line message and an exit status."""
    try:
        yield
    except BaseException as e:
        if isinstance(e, (SystemExit, GeneratorExit)):
            raise
        message = describe(e)
        if message is None:
            raise
        message = _rank_prefix() + message
        if isinstance(e, KeyboardInterrupt):
            click.echo(f"\n{message}", err=True)
            raise click.exceptions.Exit(EXIT_INTERRUPTED) from None
        if is_expected(e):
            raise click.ClickException(message) from None
        click.echo(f"Error: {message}", err=True)
        raise click.exceptions.Exit(EXIT_BUG) from None


class Command(click.Command):
    """A command that runs inside the boundary also when invoked on its own (tests, scripts)."""

    def invoke(self, ctx):
        with error_boundary():
            return super().invoke(ctx)


class Group(click.Group):
    """The `m3mlx` group: every subcommand, whoever adds it and however it was declared, runs
    inside the boundary; `@cli.command()` declares boundary Commands."""

    command_class = Command

    def invoke(self, ctx):
        with error_boundary():
            return super().invoke(ctx)
