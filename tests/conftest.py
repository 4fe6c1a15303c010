import mlx.core as mx
import pytest

from m3mlx.demo import write_demo_checkpoint


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    """A tiny random M3 checkpoint in the original Hugging Face layout, float32 on disk."""
    return write_demo_checkpoint(tmp_path_factory.mktemp("demo"), dtype=mx.float32)


@pytest.fixture(scope="session")
def demo_model(demo_dir):
    import m3mlx

    return m3mlx.load(demo_dir, dtype=mx.float32)
