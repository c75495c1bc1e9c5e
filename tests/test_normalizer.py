from __future__ import annotations

import numpy as np
import pytest
import torch

from diffpilot.data.normalizer import Normalizer


@pytest.mark.parametrize("mode", ["limits", "gaussian"])
def test_fit_maps_data_to_the_expected_range_and_inverts(mode):
    rng = np.random.default_rng(0)
    data = rng.normal([3.0, -2.0, 0.0], [5.0, 0.1, 1.0], size=(500, 3)).astype(np.float32)
    data[:, 2] = 7.0  # a constant dimension must not divide by zero
    norm = Normalizer.fit(data, mode)
    y = norm.normalize(torch.from_numpy(data))
    if mode == "limits":
        assert torch.allclose(y[:, :2].min(0).values, torch.tensor([-1.0, -1.0]), atol=1e-5)
        assert torch.allclose(y[:, :2].max(0).values, torch.tensor([1.0, 1.0]), atol=1e-5)
    else:
        assert torch.allclose(y[:, :2].mean(0), torch.zeros(2), atol=1e-4)
        assert torch.allclose(y[:, :2].std(0, unbiased=False), torch.ones(2), atol=1e-4)
    assert torch.allclose(y[:, 2], torch.zeros(500))
    assert torch.allclose(norm.unnormalize(y), torch.from_numpy(data), atol=1e-4)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="non-finite value in row 1"):
        Normalizer.fit(np.array([[0.0], [np.nan]]))
    with pytest.raises(ValueError, match="unknown normalizer mode"):
        Normalizer(2, "minmax")  # type: ignore[arg-type]
