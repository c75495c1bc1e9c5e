"""The pinned dependency set is consistent, and the devkit imports against it."""

from __future__ import annotations

import subprocess
import sys


def test_pip_check_is_clean():
    result = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_numpy_satisfies_the_devkit_pin_and_the_devkit_loads():
    import numpy as np
    from importlib.metadata import requires

    assert int(np.__version__.split(".")[0]) < 2
    assert any("numpy" in r and "<2" in r for r in requires("nuscenes-devkit") or [])
    from nuscenes.map_expansion.map_api import NuScenesMap  # noqa: F401
    from nuscenes.nuscenes import NuScenes  # noqa: F401
    from nuscenes.prediction import PredictHelper  # noqa: F401
