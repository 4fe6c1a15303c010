"""Running one model over several processes (`mlx.launch`): the group, what rank 0 shares
with the others, how the ranks agree that a step succeeded on all of them (`together`), and the
watchdog that ends a run whose ranks stop answering.

Every rank runs the same command on the same inputs (m3mlx.sharding): rank 0 owns the terminal
(and stdin), shares what only it reads (a prompt from stdin, the seed it picked), and prints;
the others compute their part and print nothing but their errors, which name their rank.
"""

import os
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from typing import Callable, Iterable, Iterator, List, Optional

import mlx.core as mx
import numpy as np

RANK_TIMEOUT = 60.0  # seconds a step may wait for the other ranks before the run ends


class DistributedError(RuntimeError):
    """A sharded run that cannot go on: which rank, and why."""


_GROUP = None


def world():
    """This process's group: size 1 unless it was started by mlx.launch (or mpirun)."""
    global _GROUP
    if _GROUP is None:
        _GROUP = mx.distributed.init()
    return _GROUP


def is_sharded() -> bool:
    return world().size() > 1


def rank_prefix() -> str:
    """'rank R of N: ' in a sharded run (messages say which rank failed), else ''."""
    if _GROUP is None or _GROUP.size() == 1:
        return ""
    return f"rank {_GROUP.rank()} of {_GROUP.size()}: "


def share_bytes(data: Optional[bytes]) -> bytes:
    """Rank 0's `data` on every rank (the others pass None)."""
    group = world()
    if group.size() == 1:
        return data
    mine = data if group.rank() == 0 else b""
    n = int(mx.distributed.all_sum(mx.array([len(mine)], mx.int32), group=group).item())
    if n == 0:
        return b""
    buf = mx.array(np.frombuffer(mine, np.uint8)) if mine else mx.zeros((n,), mx.uint8)
    return bytes(np.array(mx.distributed.all_sum(buf, group=group)))


def share_int(value: Optional[int]) -> int:
    """Rank 0's integer `value` on every rank."""
    group = world()
    if group.size() == 1:
        return value
    mine = value if group.rank() == 0 else 0
    return int(mx.distributed.all_sum(mx.array([mine], mx.int32), group=group).item())


def gather_bytes(data: bytes, group) -> List[bytes]:
    """Every rank's `data`, in rank order, on every rank of `group`."""
    n, rank = group.size(), group.rank()
    sizes = np.zeros(n, np.int32)
    sizes[rank] = len(data)
    sizes = np.array(mx.distributed.all_sum(mx.array(sizes), group=group))
    ends = np.cumsum(sizes)
    if not ends[-1]:
        return [b""] * n
    buf = np.zeros(int(ends[-1]), np.uint8)
    buf[ends[rank] - len(data):ends[rank]] = np.frombuffer(data, np.uint8)
    whole = bytes(np.array(mx.distributed.all_sum(mx.array(buf), group=group)))
    return [whole[end - size:end] for end, size in zip(ends.tolist(), sizes.tolist())]


@contextmanager
def together(group):
    """Run the block on every rank of `group`, and go on only when it succeeded on all of
    them: a failure on any rank is raised on every rank as one InputError naming the first
    rank that failed, so the ranks stay in step (a failure that is not bad input stays itself
    on its own rank). The ranks meet once, as the block ends: it must not use the group."""
    from .checks import InputError

    failure = None
    try:
        yield
    except Exception as e:
        failure = e
    messages = gather_bytes(_one_line(failure).encode() if failure else b"", group)
    for rank, message in enumerate(messages):
        if message:
            if failure is not None and not isinstance(failure, (InputError, OSError)):
                raise failure
            raise InputError(f"rank {rank} of {group.size()}: {message.decode()}") from failure


def _one_line(e: Exception) -> str:
    if isinstance(e, OSError) and e.strerror:
        return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    return " ".join(str(e).split()) or type(e).__name__


@contextmanager
def lost_ranks_reported(what: str):
    """A backend's "connection lost" (a rank died, its sockets closed) as a DistributedError."""
    try:
        yield
    except RuntimeError as e:
        if any(tag in str(e) for tag in ("[ring]", "[jaccl]", "[mpi]")):
            raise DistributedError(f"lost the other ranks while {what} ({e}); another rank "
                                   "failed or its link went down: see its message") from None
        raise


class Watchdog:
    """Ends the process with a one-line message when an armed run makes no progress for
    `timeout` seconds: a rank that hangs, or a link that went quiet, would otherwise leave the
    others waiting in a collective forever. `progress()` marks each step."""

    def __init__(self, timeout: float = RANK_TIMEOUT):
        self.timeout = timeout
        self.last: Optional[float] = None
        self.what = ""
        self._thread = None

    def progress(self, *_):
        self.last = time.monotonic()

    @contextmanager
    def armed(self, what: str):
        """Watch the block: `what` it is doing goes into the message."""
        self.what, self.last = what, time.monotonic()
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, daemon=True)
            self._thread.start()
        try:
            with lost_ranks_reported(what):
                yield self
        finally:
            self.last = None

    def _watch(self):
        while True:
            time.sleep(min(1.0, self.timeout / 4))
            last = self.last
            if last is not None and time.monotonic() - last > self.timeout:
                sys.stderr.write(
                    f"Error: {rank_prefix()}no answer from the other ranks for "
                    f"{self.timeout:g} s while {self.what}: a rank hangs or its link is down; "
                    "ending this rank\n")
                sys.stderr.flush()
                os._exit(1)


def load_for_rank(model_path: str, parallel: str, dtype=None, kv_bits=None, **memory):
    """(model, tokenizer): the whole model in a single process, this rank's part when
    launched on several. `memory`: the expert cache options of `load`, per rank."""
    from .loading import load
    from .rank_loading import load_rank

    if not is_sharded():
        return load(model_path, dtype=dtype, kv_bits=kv_bits, **memory)
    return load_rank(model_path, parallel, world(), dtype=dtype, kv_bits=kv_bits, **memory)



class Ranks:
    """This process's part in a run: the only process, or one rank of several (mlx.launch)."""

    def __init__(self, group, watchdog: Optional[Watchdog]):
        self.group, self.watchdog = group, watchdog

    @classmethod
    def alone(cls) -> "Ranks":
        """A single process."""
        return cls(None, None)

    @classmethod
    def start(cls, timeout: float = RANK_TIMEOUT) -> "Ranks":
        """Join the run; ranks other than 0 stop printing to stdout (rank 0 prints the text)."""
        group = world()
        if group.size() == 1:
            return cls(group, None)
        if group.rank() != 0:
            sys.stdout.flush()
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        return cls(group, Watchdog(timeout))

    @property
    def sharded(self) -> bool:
        return self.watchdog is not None

    @property
    def leads(self) -> bool:
        """Rank 0 (or the only process): the one that reads stdin and prints."""
        return self.group is None or self.group.rank() == 0

    def lines(self, source: Iterable[bytes]) -> Iterator[bytes]:
        """The lines of rank 0's `source` (stdin), on every rank; the others never read
        theirs. Waiting for the next line is not watched: a person may take their time."""
        if not self.sharded:
            yield from source
            return
        lines = iter(source) if self.leads else None
        while True:
            with lost_ranks_reported("waiting for input"):
                line = share_bytes(next(lines, b"") if self.leads else None)
            if not line:
                return
            yield line

    def seed(self, seed: Optional[int]) -> Optional[int]:
        """The seed every rank samples with: the one given, or one rank 0 picks (ranks with
        seeds of their own would pick different tokens)."""
        if not self.sharded:
            return seed
        return share_int(seed if seed is not None else time.time_ns() % (1 << 31))

    def watching(self, what: str):
        """Run the block under the watchdog, once every rank has got here (loaded its part)."""
        if not self.sharded:
            return nullcontext()
        with self.watchdog.armed("waiting for the other ranks to load"):
            mx.eval(mx.distributed.all_sum(mx.zeros((1,)), group=self.group))
        return self.watchdog.armed(what)

    def armed(self, what: str):
        """Run the block under the watchdog (nothing to watch in a single process)."""
        return self.watchdog.armed(what) if self.sharded else nullcontext()

    def share(self, data: Optional[bytes], waiting: str = "sharing data") -> bytes:
        """Rank 0's `data` on every rank; a lost rank is a DistributedError saying `waiting`."""
        with lost_ranks_reported(waiting):
            return share_bytes(data)

    def share_int(self, value: int) -> int:
        """Rank 0's `value` on every rank (within a watched block)."""
        return share_int(value)

    def least(self, value: int) -> int:
        """The smallest of the ranks' `value`s, on every rank."""
        if not self.sharded:
            return value
        return int(mx.distributed.all_min(mx.array([value], mx.int32), group=self.group).item())

    def prefix(self) -> str:
        """'rank R of N: ' when sharded, for messages."""
        return rank_prefix()

    def step(self):
        if self.watchdog is not None:
            self.watchdog.progress()

    def stepping(self, stream):
        """`stream` (an iterable of generated pieces), each piece marked as a step."""
        return stream if not self.sharded else _Stepping(stream, self.step)

    def progress(self, meter: Callable[[int, int], None]) -> Callable[[int, int], None]:
        """`meter` for a prefill's progress, also marking each chunk as a step."""
        if not self.sharded:
            return meter

        def both(done: int, total: int):
            self.step()
            meter(done, total)

        return both


class _Stepping:
    """An iterable that marks each item as a step; everything else is the wrapped stream's."""

    def __init__(self, stream, step: Callable[[], None]):
        self._stream, self._step = stream, step

    def __iter__(self):
        for item in self._stream:
            self._step()
            yield item

    def __getattr__(self, name):
        return getattr(self._stream, name)
