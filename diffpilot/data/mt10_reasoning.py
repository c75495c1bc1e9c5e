"""Reasoning text for the Meta-World MT10 scripted experts: which phase the expert is in, and where things are.

:func:`annotate` reads a 39-dim Meta-World state (hand xyz, gripper opening,
object position and quaternion, the previous frame, goal xyz) and returns
the expert's current sub-goal and a sentence about the scene. The phase
conditions re-derive the branch the Meta-World v3 scripted policy
(``metaworld/policies/sawyer_<task>_v3_policy.py``) takes for that state,
so the sub-goal at step *t* is the one that produced the expert's action
*t*. Example::

    carry the puck to the goal ; the puck is at the gripper , near ; the goal is ahead and left of the gripper , far

Words are lowercase and separated by single spaces; ``;`` and ``,`` are
tokens of their own, so ``text.split()`` is a word-level tokenizer. The
first clause is the sub-goal (:func:`subgoal_of`), one of the task's
:data:`SUBGOALS`; then where the task's object is relative to the gripper,
and, while the expert heads for the goal (or the hole), where that is.

Directions are the robot's view: the robot stands at y = 0 facing +y, so
+x is *right*, +y *ahead*, +z *above*. A relation names the axis with the
largest offset, and a second axis when its offset is at least half the
largest; offsets under :data:`AT_DISTANCE` on every axis read *at the
gripper*. *near* means closer than :data:`NEAR_DISTANCE`. For the tasks
whose object is held between the fingers (push, pick-place,
peg-insert-side) "the gripper" is the point between the fingertips,
:data:`FINGERTIP_DROP` below the hand position the state reports, so a
grasped puck or peg reads *at the gripper*.

The experts' phases follow their scripts: they move forward in the order of
:data:`SUBGOALS`, except where a script itself steps back (the peg expert
returns to "carry the peg to the hole" when the peg drifts off the hole's
axis while it inserts).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["AT_DISTANCE", "FINGERTIP_DROP", "NEAR_DISTANCE", "OBJECTS", "SUBGOALS", "Annotation", "annotate", "describe_relation",
           "subgoal_index", "subgoal_of"]

AT_DISTANCE = 0.02
"""Metres: an offset below this on every axis is *at the gripper*."""
NEAR_DISTANCE = 0.05
"""Metres: closer than this is *near*, else *far*."""
FINGERTIP_DROP = 0.03
"""Metres from the reported hand position down to where a grasped object sits (measured: 2.4-3.9 cm)."""
_HELD = ("push", "pick-place", "peg-insert-side")

SUBGOALS: dict[str, list[str]] = {
    "reach": ["reach for the goal"],
    "push": ["move above the puck", "lower onto the puck", "push the puck to the goal"],
    "pick-place": ["move above the puck", "lower onto the puck", "close the gripper", "carry the puck to the goal"],
    "door-open": ["move above the door handle", "lower beside the door handle", "pull the door open"],
    "drawer-open": ["move above the drawer handle", "lower onto the drawer handle", "pull the drawer open"],
    "drawer-close": ["lift the gripper", "move in front of the drawer", "lower in front of the drawer",
                     "push the drawer closed"],
    "button-press-topdown": ["move above the button", "press the button down"],
    "peg-insert-side": ["move above the peg", "lower onto the peg", "carry the peg to the hole",
                        "insert the peg into the hole"],
    "window-open": ["move above the window handle", "lower to the window handle", "slide the window open"],
    "window-close": ["move above the window handle", "lower to the window handle", "slide the window closed"],
}
"""Each task's sub-goals in the order the expert goes through them."""

OBJECTS: dict[str, str] = {
    "reach": "goal", "push": "puck", "pick-place": "puck", "door-open": "door handle",
    "drawer-open": "drawer handle", "drawer-close": "drawer handle", "button-press-topdown": "button",
    "peg-insert-side": "peg", "window-open": "window handle", "window-close": "window handle",
}
"""The object each task's text talks about (``state[4:7]``; reach: the goal ``state[36:39]``)."""

_GOAL_PHASES: dict[str, tuple[str, int]] = {  # task -> (goal's name, first phase index that heads for it)
    "push": ("goal", 2), "pick-place": ("goal", 3), "peg-insert-side": ("hole", 2),
}


@dataclass(frozen=True)
class Annotation:
    """The expert's sub-goal (one of ``SUBGOALS[task]``) and the full reasoning sentence."""

    subgoal: str
    text: str


def _phase(task: str, s: np.ndarray) -> int:
    """Index into ``SUBGOALS[task]`` of the scripted expert's branch for state ``s`` (same thresholds)."""
    hand, obj, goal = s[0:3], s[4:7], s[36:39]
    if task == "reach":
        return 0
    if task in ("push", "pick-place"):
        puck = obj + np.array([-0.005, 0.0, 0.0])
        if np.linalg.norm(hand[:2] - puck[:2]) > 0.02:
            return 0
        if task == "push":
            return 1 if abs(hand[2] - puck[2]) > 0.04 else 2
        if abs(hand[2] - puck[2]) > 0.05 and puck[2] < 0.04:
            return 1
        return 2 if s[3] > 0.73 else 3
    if task == "door-open":
        door = obj - np.array([0.05, 0.0, 0.0])
        if np.linalg.norm(hand[:2] - door[:2]) > 0.12:
            return 0
        return 1 if abs(hand[2] - door[2]) > 0.04 else 2
    if task in ("drawer-open", "drawer-close"):
        drawer = obj + np.array([0.0, 0.0, -0.02])
        if task == "drawer-open":
            if np.linalg.norm(hand[:2] - drawer[:2]) > 0.06:
                return 0
            return 1 if abs(hand[2] - drawer[2]) > 0.04 else 2
        if hand[1] > drawer[1]:
            return 0 if hand[2] < drawer[2] + 0.23 else 1
        return 2 if abs(hand[2] - drawer[2]) > 0.04 else 3
    if task == "button-press-topdown":
        return 0 if np.linalg.norm(hand[:2] - obj[:2]) > 0.04 else 1
    if task == "peg-insert-side":
        hole = np.array([-0.35, goal[1], 0.16])
        if np.linalg.norm(hand[:2] - obj[:2]) > 0.04:
            return 0
        if abs(hand[2] - obj[2]) > 0.025:
            return 1
        return 2 if np.linalg.norm(obj[1:] - hole[1:]) > 0.03 else 3
    if task in ("window-open", "window-close"):
        window = obj + np.array([-0.03 if task == "window-open" else 0.03, -0.03, -0.08])
        if np.linalg.norm(hand[:2] - window[:2]) > 0.04:
            return 0
        return 1 if abs(hand[2] - window[2]) > 0.02 else 2
    raise ValueError(f"unknown MT10 task {task!r}; valid tasks: {list(SUBGOALS)}")


_WORDS = (("left of", "right of"), ("behind", "ahead of"), ("below", "above"))  # (negative, positive) per axis


def describe_relation(offset: np.ndarray) -> str:
    """Where a point at ``offset`` (point minus gripper, metres) is, e.g. ``"ahead and left of the gripper"``."""
    d = np.asarray(offset, dtype=np.float64)[:3]
    mag = np.abs(d)
    if mag.max() < AT_DISTANCE:
        return "at the gripper"
    order = np.argsort(-mag, kind="stable")
    axes = [int(order[0])]
    if mag[order[1]] >= max(0.5 * mag[order[0]], AT_DISTANCE):
        axes.append(int(order[1]))
    words = [_WORDS[a][int(d[a] > 0)] for a in axes]
    if len(words) == 2:  # "ahead of" + "left of" -> "ahead and left of"
        first = words[0][:-3] if words[0].endswith(" of") else words[0]
        return f"{first} and {words[1]} the gripper"
    return f"{words[0]} the gripper"


def _clause(name: str, offset: np.ndarray) -> str:
    near = "near" if float(np.linalg.norm(offset)) < NEAR_DISTANCE else "far"
    return f"the {name} is {describe_relation(offset)} , {near}"


def annotate(task: str, state: np.ndarray) -> Annotation:
    """The expert's sub-goal for the 39-dim ``state`` and the sentence about it (see the module docstring)."""
    if task not in SUBGOALS:
        raise ValueError(f"unknown MT10 task {task!r}; valid tasks: {list(SUBGOALS)}")
    s = np.asarray(state, dtype=np.float64).reshape(-1)
    if s.shape[0] != 39:
        raise ValueError(f"an MT10 state has 39 numbers, got {s.shape[0]}")
    phase = _phase(task, s)
    subgoal = SUBGOALS[task][phase]
    hand = s[0:3] - np.array([0.0, 0.0, FINGERTIP_DROP if task in _HELD else 0.0])
    obj = s[36:39] if task == "reach" else s[4:7]
    parts = [subgoal, _clause(OBJECTS[task], obj - hand)]
    if task in _GOAL_PHASES and phase >= _GOAL_PHASES[task][1]:
        parts.append(_clause(_GOAL_PHASES[task][0], s[36:39] - hand))
    return Annotation(subgoal=subgoal, text=" ; ".join(parts))


def subgoal_of(text: str) -> str:
    """The sub-goal of a reasoning sentence: the text before the first ``" ;"``."""
    return text.split(" ;", 1)[0].strip()


def subgoal_index(task: str, subgoal: str) -> int:
    """Position of ``subgoal`` in ``SUBGOALS[task]`` (ValueError naming the valid ones if it is not there)."""
    if task not in SUBGOALS:
        raise ValueError(f"unknown MT10 task {task!r}; valid tasks: {list(SUBGOALS)}")
    try:
        return SUBGOALS[task].index(subgoal)
    except ValueError:
        raise ValueError(f"{subgoal!r} is no sub-goal of {task}; its sub-goals: {SUBGOALS[task]}") from None
