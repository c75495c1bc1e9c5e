"""Test-session settings shared by every test module."""

import os

os.environ.setdefault("MUJOCO_GL", "egl")

import pytest  # noqa: E402
import torch  # noqa: E402

# The suite's models are small: one intra-op thread is as fast as two and
# avoids OpenMP threads spinning against each other when the CPU is shared.
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory: pytest.TempPathFactory):
    """Generated data sets go to a cache of this session's own, never ``~/.cache/diffpilot``.

    Under pytest-xdist every worker has its own temporary root, so parallel
    workers never build or replace the same cache files, and no test passes
    on a data set left over from an earlier run. Tests that need a fresh
    cache still point ``DIFFPILOT_CACHE`` at their ``tmp_path``.
    """
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIFFPILOT_CACHE", str(tmp_path_factory.mktemp("diffpilot-cache")))
        yield
