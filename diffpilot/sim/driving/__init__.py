"""Closed-loop driving: kinematic ego model, trajectory trackers, log-replay
and reactive traffic, the closed-loop simulator and NAVSIM-style PDM scoring.

Import the parts from their modules (``vehicle``, ``tracker``, ``geometry``,
``agents``, ``simulator``, ``scoring``, ``openloop``); this package file stays
empty of imports so that using one part does not load the others.
"""
