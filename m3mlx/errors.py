"""The error every bad model directory, checkpoint file or config raises.

`CheckpointError` is the base: the reader (`m3mlx.checkpoint`) raises it, and the entry points'
own errors build on it (`ConfigError` for config.json fields, `LoadError` in the loader,
`ConvertError` in the converter), so one `except CheckpointError` reports them all the same way:
a one-line message saying what is wrong, in which file, and what to do.
"""

from contextlib import contextmanager


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: what is wrong, which file, what to do."""


# How the reader's messages end: right for a downloaded checkpoint, not for what m3mlx wrote.
DOWNLOAD_AGAIN = "; download it again"


@contextmanager
def reported_as(error_type, *keep, advice=None):
    """Re-raise the reader's checkpoint errors as the entry point's own `error_type` (same
    message, its "download it again" replaced by `advice` when given, e.g. for files m3mlx
    wrote itself); `error_type` itself and the subclasses in `keep` pass through unchanged."""
    try:
        yield
    except (error_type, *keep):
        raise
    except CheckpointError as e:
        message = str(e)
        if advice is not None:
            message = f"{message.removesuffix(DOWNLOAD_AGAIN)}; {advice}"
        raise error_type(message) from e
