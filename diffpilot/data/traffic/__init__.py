"""Traffic simulation on built-in road networks: the embedded default driving data.

``roads`` builds the maps (lanes, junctions, stop lines, crosswalks),
``idm`` holds the car-following and lane-change models, ``simulate`` runs a
scene and records it as a :class:`~diffpilot.data.scenario.ScenarioLog`,
and ``generate`` simulates a data set and writes it in the nuScenes format.
"""

from __future__ import annotations

from diffpilot.data.traffic.generate import (
    generate_driving_dataset,
    scene_plan,
    simulate_scenes,
    simulate_scenes_with_stats,
    split_scenes,
)
from diffpilot.data.traffic.roads import LOCATIONS, RoadNetwork, build_network, build_networks
from diffpilot.data.traffic.simulate import SceneStats, TrafficSimulation, simulate_scene

__all__ = [
    "LOCATIONS",
    "RoadNetwork",
    "SceneStats",
    "TrafficSimulation",
    "build_network",
    "build_networks",
    "generate_driving_dataset",
    "scene_plan",
    "simulate_scene",
    "simulate_scenes",
    "simulate_scenes_with_stats",
    "split_scenes",
]
