"""Test-session settings shared by every test module."""

import os

os.environ.setdefault("MUJOCO_GL", "egl")

import torch  # noqa: E402

# The suite's models are small: one intra-op thread is as fast as two and
# avoids OpenMP threads spinning against each other when the CPU is shared.
torch.set_num_threads(1)
