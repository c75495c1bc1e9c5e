"""A MuJoCo pick-and-place task with a two-finger gripper, a scripted expert, and its data sets.

The gripper is a free-floating hand on three position-controlled slide
joints (x, y, z) with two position-controlled fingers; a 4 cm cube lies on a
table and must be carried to a target point, on the table or in the air.
Actions are ``(dx, dy, dz, grip)`` in [-1, 1]: the first three move the hand
target by up to :data:`MAX_STEP` metres per control step, ``grip`` is a
discrete command (> 0 open, <= 0 close), so a policy must produce both
continuous and discrete action dimensions. Observations (16,): hand
position (3) and velocity (3), finger opening (1), cube position (3), cube
minus hand (3), target (3).

The expert is a waypoint script (above the cube, down, close, lift to the
target, hold) with a proportional controller and action noise; it re-grasps
when the cube slips. Data sets use the D4RL layout with reference returns
computed the D4RL way (random policy for min, expert for max) in metadata.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import mujoco
import numpy as np
from tqdm.auto import tqdm

from diffpilot.data.d4rl import OfflineDataset, write_d4rl

CONTROL_DT = 0.04  # 25 Hz, as the Fetch tasks
SUBSTEPS = 20
MAX_STEP = 0.03  # metres of hand-target motion per unit action
EPISODE_STEPS = 100
SUCCESS_DISTANCE = 0.05
OBJECT_HALF = 0.02
FINGER_OPEN = 0.045
GRIP_DIM = 3
OBS_DIM = 16
ACTION_DIM = 4

_XML = f"""
<mujoco model="pick_place">
  <option timestep="{CONTROL_DT / SUBSTEPS}" cone="elliptic" impratio="10"/>
  <default>
    <geom solref="0.01 1" solimp="0.95 0.99 0.001"/>
  </default>
  <worldbody>
    <light pos="0 0 1.5" dir="0 0 -1"/>
    <geom name="table" type="box" size="0.4 0.4 0.02" pos="0 0 -0.02" rgba="0.8 0.7 0.6 1"/>
    <body name="hand" pos="0 0 0.15" gravcomp="1">
      <joint name="hand_x" type="slide" axis="1 0 0" damping="60" range="-0.3 0.3"/>
      <joint name="hand_y" type="slide" axis="0 1 0" damping="60" range="-0.3 0.3"/>
      <joint name="hand_z" type="slide" axis="0 0 1" damping="60" range="-0.14 0.2"/>
      <geom name="palm" type="box" size="0.015 0.06 0.01" pos="0 0 0.035" mass="0.5" rgba="0.3 0.3 0.3 1"/>
      <body name="finger_l" gravcomp="1">
        <joint name="finger_l" type="slide" axis="0 1 0" range="0 0.05" damping="2"/>
        <geom name="finger_l" type="box" size="0.012 0.005 0.03" pos="0 0.005 0.015" mass="0.05"
              friction="2 0.05 0.01" condim="4" rgba="0.2 0.2 0.8 1"/>
      </body>
      <body name="finger_r" gravcomp="1">
        <joint name="finger_r" type="slide" axis="0 -1 0" range="0 0.05" damping="2"/>
        <geom name="finger_r" type="box" size="0.012 0.005 0.03" pos="0 -0.005 0.015" mass="0.05"
              friction="2 0.05 0.01" condim="4" rgba="0.2 0.2 0.8 1"/>
      </body>
    </body>
    <body name="cube" pos="0.1 0 {OBJECT_HALF}">
      <freejoint name="cube"/>
      <geom name="cube" type="box" size="{OBJECT_HALF} {OBJECT_HALF} {OBJECT_HALF}" mass="0.05"
            friction="2 0.05 0.01" condim="4" rgba="0.9 0.2 0.2 1"/>
    </body>
    <site name="target" pos="0 0 0.1" size="0.02" rgba="0.1 0.9 0.1 0.4"/>
  </worldbody>
  <actuator>
    <position name="hand_x" joint="hand_x" kp="1500" ctrlrange="-0.3 0.3"/>
    <position name="hand_y" joint="hand_y" kp="1500" ctrlrange="-0.3 0.3"/>
    <position name="hand_z" joint="hand_z" kp="1500" ctrlrange="-0.14 0.2"/>
    <position name="finger_l" joint="finger_l" kp="300" ctrlrange="0 0.05"/>
    <position name="finger_r" joint="finger_r" kp="300" ctrlrange="0 0.05"/>
  </actuator>
</mujoco>
"""


class PickPlaceEnv(gym.Env):
    """Pick up the cube and bring it within 5 cm of the target; sparse reward 1 per step while there."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": int(1 / CONTROL_DT)}

    def __init__(self, render_mode: str | None = None, air_target_share: float = 0.5) -> None:
        self.model = mujoco.MjModel.from_xml_string(_XML)
        self.data = mujoco.MjData(self.model)
        self.render_mode = render_mode
        self.air_target_share = air_target_share
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (OBS_DIM,), np.float64)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (ACTION_DIM,), np.float32)
        self._cube_qpos = self.model.jnt_qposadr[mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_JOINT, "cube")]
        self._target_site = mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_SITE, "target")
        self._hand_qpos = self.model.jnt_qposadr[[mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_JOINT, n) for n in ("hand_x", "hand_y", "hand_z")]]
        self._finger_qpos = self.model.jnt_qposadr[mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_JOINT, "finger_l")]
        self._renderer: mujoco.Renderer | None = None
        self.target = np.zeros(3)

    # hand origin = point between the fingertips' centres (the grasp point)
    def _hand(self) -> np.ndarray:
        return self.data.qpos[self._hand_qpos] + np.array([0.0, 0.0, 0.15])

    def _obs(self) -> np.ndarray:
        hand = self._hand()
        hand_vel = self.data.qvel[[self.model.jnt_dofadr[self.model.joint(n).id] for n in ("hand_x", "hand_y", "hand_z")]]
        cube = self.data.qpos[self._cube_qpos : self._cube_qpos + 3].copy()
        opening = np.array([self.data.qpos[self._finger_qpos]])
        return np.concatenate([hand, hand_vel, opening, cube, cube - hand, self.target])

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        mujoco.mj_resetData(self.model, self.data)
        rng = self.np_random
        cube_xy = rng.uniform(-0.15, 0.15, size=2)
        while True:
            target_xy = rng.uniform(-0.15, 0.15, size=2)
            if np.linalg.norm(target_xy - cube_xy) > 0.08:
                break
        target_z = rng.uniform(0.05, 0.2) if rng.random() < self.air_target_share else OBJECT_HALF
        self.target = np.array([*target_xy, target_z])
        self.model.site_pos[self._target_site] = self.target
        q = self._cube_qpos
        self.data.qpos[q : q + 3] = [*cube_xy, OBJECT_HALF]
        self.data.qpos[q + 3 : q + 7] = [1, 0, 0, 0]
        self.data.qpos[self._finger_qpos] = FINGER_OPEN
        self.data.qpos[self._finger_qpos + 1] = FINGER_OPEN
        self.data.ctrl[:] = [0.0, 0.0, 0.0, FINGER_OPEN, FINGER_OPEN]
        mujoco.mj_forward(self.model, self.data)
        self._steps = 0
        return self._obs(), {"success": False}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        a = np.asarray(action, dtype=np.float64)
        if a.shape != (ACTION_DIM,):
            raise ValueError(f"PickPlaceEnv.step expects an action of shape ({ACTION_DIM},), got {a.shape}")
        if not np.isfinite(a).all():
            raise ValueError(f"PickPlaceEnv.step got a non-finite action: {a}")
        a = np.clip(a, -1.0, 1.0)
        hand_joint = self.data.qpos[self._hand_qpos]
        self.data.ctrl[:3] = np.clip(hand_joint + MAX_STEP * a[:3], self.model.actuator_ctrlrange[:3, 0], self.model.actuator_ctrlrange[:3, 1])
        finger = FINGER_OPEN if a[GRIP_DIM] > 0 else 0.0
        self.data.ctrl[3:5] = finger
        mujoco.mj_step(self.model, self.data, nstep=SUBSTEPS)
        self._steps += 1
        obs = self._obs()
        distance = float(np.linalg.norm(obs[7:10] - self.target))
        success = distance < SUCCESS_DISTANCE
        return obs, float(success), False, False, {"success": success, "distance": distance}

    def render(self) -> np.ndarray | None:
        if self.render_mode != "rgb_array":
            return None
        if self._renderer is None:
            self._renderer = mujoco.Renderer(self.model, 240, 320)
        self._renderer.update_scene(self.data)
        return self._renderer.render()

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None


def make_pick_place_env(render_mode: str | None = None) -> gym.Env:
    """The task with its episode limit (100 steps, 4 s)."""
    return gym.wrappers.TimeLimit(PickPlaceEnv(render_mode=render_mode), EPISODE_STEPS)


@dataclass
class PickPlaceExpert:
    """Waypoint script: approach above the cube, descend, close, carry to the target, hold.

    ``noise`` is Gaussian action noise on the motion dimensions (the data
    sets' diversity); the grip command is never noised, it is discrete.
    """

    gain: float = 12.0
    noise: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)
        self.reset()

    def reset(self, seed: int | None = None) -> None:
        if seed is not None:
            self.rng = np.random.default_rng(seed)
        self.phase = "approach"
        self.closed_steps = 0

    def act(self, obs: np.ndarray) -> np.ndarray:
        hand, cube, target = obs[0:3], obs[7:10], obs[13:16]
        rel = cube - hand
        grip = 1.0
        if self.phase in ("carry",) and np.linalg.norm(rel) > 0.04:
            self.phase = "approach"  # dropped it: grasp again
        if self.phase == "approach":
            goal = cube + np.array([0.0, 0.0, 0.06])
            if np.linalg.norm(goal - hand) < 0.015:
                self.phase = "descend"
        if self.phase == "descend":
            goal = cube.copy()
            if np.linalg.norm(rel[:2]) > 0.02:
                self.phase = "approach"
                goal = cube + np.array([0.0, 0.0, 0.06])
            elif abs(rel[2]) < 0.008:
                self.phase, self.closed_steps = "close", 0
        if self.phase == "close":
            goal, grip = cube.copy(), -1.0
            self.closed_steps += 1
            if self.closed_steps >= 5:
                self.phase = "carry"
        if self.phase == "carry":
            goal, grip = target.copy(), -1.0
        action = np.clip(self.gain * (goal - hand), -1.0, 1.0)
        if self.noise > 0:
            action = np.clip(action + self.noise * self.rng.standard_normal(3), -1.0, 1.0)
        return np.array([*action, grip], dtype=np.float32)


def _rollout(env: gym.Env, act, seed: int) -> dict[str, np.ndarray]:
    obs, _ = env.reset(seed=seed)
    rows: dict[str, list] = {k: [] for k in ("observations", "actions", "rewards", "next_observations", "success")}
    done = False
    while not done:
        action = act(obs)
        next_obs, reward, terminated, truncated, info = env.step(action)
        for key, value in zip(rows, (obs, action, reward, next_obs, info["success"])):
            rows[key].append(value)
        obs, done = next_obs, terminated or truncated
    out = {k: np.asarray(v) for k, v in rows.items()}
    out["timeouts"] = np.zeros(len(out["rewards"]), dtype=bool)
    out["timeouts"][-1] = True
    return out


def reference_scores(episodes: int = 100, seed: int = 0) -> tuple[float, float]:
    """(random, expert) mean returns, the D4RL way: uniform random actions; the noise-free expert."""
    env = make_pick_place_env()
    rng = np.random.default_rng(seed)
    random_ret = [_rollout(env, lambda _o: rng.uniform(-1, 1, ACTION_DIM).astype(np.float32), seed + i)["rewards"].sum() for i in range(episodes)]
    expert = PickPlaceExpert(noise=0.0, seed=seed)
    expert_ret = []
    for i in range(episodes):
        expert.reset()
        expert_ret.append(_rollout(env, expert.act, seed + 10_000 + i)["rewards"].sum())
    return float(np.mean(random_ret)), float(np.mean(expert_ret))


def generate_pick_place(
    path: str | os.PathLike[str], episodes: int = 200, noise: float = 0.1, seed: int = 0,
    reference_episodes: int = 50, progress: bool = True,
) -> Path:
    """Expert demonstrations in the D4RL layout (one episode = one timeout), written atomically."""
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    env = make_pick_place_env()
    expert = PickPlaceExpert(noise=noise, seed=seed)
    chunks = []
    for i in tqdm(range(episodes), desc="pick-place demos", disable=not progress):
        expert.reset()
        chunks.append(_rollout(env, expert.act, seed * 100_000 + i))
    cat = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
    ref_min, ref_max = reference_scores(reference_episodes, seed=seed)
    n = len(cat["rewards"])
    dataset = OfflineDataset(
        observations=cat["observations"].astype(np.float32),
        actions=cat["actions"].astype(np.float32),
        rewards=cat["rewards"].astype(np.float32),
        terminals=np.zeros(n, dtype=bool),
        timeouts=cat["timeouts"],
        next_observations=cat["next_observations"].astype(np.float32),
        infos={"success": cat["success"].astype(bool)},
        metadata={
            "env": "diffpilot-pick-place", "generator": "scripted expert with Gaussian action noise",
            "noise": noise, "seed": seed, "ref_min_score": ref_min, "ref_max_score": ref_max,
            "reference": "local (random actions / noise-free expert)", "discrete_action_dims": [GRIP_DIM],
        },
    )
    return write_d4rl(path, dataset)
