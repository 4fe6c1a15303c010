class ConvertError(RuntimeError):
    """A conversion that cannot go on: what was wrong, and what to do about it.

    Raised before anything is written whenever the problem can be seen up front (bad source,
    bad options, not enough disk, an output directory in the way)."""
