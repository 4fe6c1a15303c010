from m3mlx.errors import CheckpointError


class ConvertError(CheckpointError):
    """A conversion that cannot go on: what was wrong, and what to do about it.

    Raised before anything is written whenever the problem can be seen up front (bad source,
    bad options, not enough disk, an output directory in the way). The checkpoint reader's own
    errors reach `convert()` callers as ConvertError too, with the same message."""
