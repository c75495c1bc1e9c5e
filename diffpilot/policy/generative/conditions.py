"""Conditions a sampler passes to its network: a tensor, or several masked token sets.

A condition is ``None``, a tensor (a ``(B, C)`` vector or ``(B, N, C)``
tokens), or a :class:`TokenSets`: named token sets ``(B, N_i, D)``, each with
an optional key-padding mask ``(B, N_i)`` bool, True = ignore (the convention
of :meth:`~diffpilot.policy.networks.scene_encoder.SceneEncoder.forward_groups`
and of :class:`~diffpilot.policy.networks.transformer.TransformerDenoiser`'s
``cond_mask``). Objectives and samplers never look inside a condition: they
hand it to the network unchanged. Code that batches conditions (repeating a
scene for several candidates, picking rows) uses :func:`cond_index`,
:func:`cond_repeat_interleave` and :func:`cond_to`, which work for every form.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
import torch
from torch import Tensor

__all__ = [
    "Condition",
    "TokenSets",
    "cond_batch_size",
    "cond_index",
    "cond_repeat_interleave",
    "cond_to",
]


class TokenSets(Mapping[str, tuple[Tensor, Tensor | None]]):
    """Named condition token sets with their masks: ``name -> (tokens (B, N, D), mask (B, N) bool or None)``.

    A mapping in insertion order (the order a network concatenates or fuses
    the sets in). Every set has the same batch size ``B``; ``N`` may differ.
    A set may be given as a bare tensor (no mask). The container is immutable:
    the batch operations return new ones.
    """

    def __init__(self, sets: Mapping[str, tuple[Tensor, Tensor | None] | Tensor]) -> None:
        if not sets:
            raise ValueError("TokenSets needs at least one token set")
        items: dict[str, tuple[Tensor, Tensor | None]] = {}
        batch = None
        for name, value in sets.items():
            tokens, mask = (value, None) if isinstance(value, Tensor) else value
            if not isinstance(tokens, Tensor) or tokens.dim() != 3:
                got = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
                raise ValueError(f"token set {name!r}: tokens must be a (B, N, D) tensor, got {got}")
            if batch is None:
                batch = tokens.shape[0]
            elif tokens.shape[0] != batch:
                raise ValueError(f"token set {name!r} has batch size {tokens.shape[0]}, the first set {batch}")
            if mask is not None and (
                not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != tuple(tokens.shape[:2])
            ):
                got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
                raise ValueError(
                    f"token set {name!r}: mask must be a bool (B, N) = {tuple(tokens.shape[:2])} tensor "
                    f"(True = ignore) or None, got {got}"
                )
            items[str(name)] = (tokens, mask)
        self._sets = items

    def __getitem__(self, name: str) -> tuple[Tensor, Tensor | None]:
        return self._sets[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._sets)

    def __len__(self) -> int:
        return len(self._sets)

    def __repr__(self) -> str:
        parts = ", ".join(
            f"{k}: {tuple(t.shape)}{'' if m is None else ' masked'}" for k, (t, m) in self._sets.items()
        )
        return f"TokenSets({parts})"

    @property
    def batch_size(self) -> int:
        return next(iter(self._sets.values()))[0].shape[0]

    def concat(self) -> tuple[Tensor, Tensor | None]:
        """All sets as one ``(B, sum N, D)`` token tensor and its mask (None when no set has one)."""
        dims = {k: t.shape[-1] for k, (t, _) in self._sets.items()}
        if len(set(dims.values())) > 1:
            raise ValueError(f"token sets to concatenate need one feature size D, got {dims}")
        tokens = torch.cat([t for t, _ in self._sets.values()], dim=1)
        if all(m is None for _, m in self._sets.values()):
            return tokens, None
        masks = [
            torch.zeros(t.shape[:2], dtype=torch.bool, device=t.device) if m is None else m
            for t, m in self._sets.values()
        ]
        return tokens, torch.cat(masks, dim=1)

    def map(self, tokens_fn: Callable[[Tensor], Tensor], mask_fn: Callable[[Tensor], Tensor]) -> TokenSets:
        """A new container with ``tokens_fn`` applied to every token tensor and ``mask_fn`` to every mask."""
        return TokenSets({k: (tokens_fn(t), None if m is None else mask_fn(m)) for k, (t, m) in self._sets.items()})

    def index(self, idx: Tensor | slice | int | list[int]) -> TokenSets:
        """Rows ``idx`` of the batch (as ``tensor[idx]``; an int keeps the batch dimension)."""
        if isinstance(idx, int):
            idx = slice(idx, idx + 1) if idx != -1 else slice(-1, None)
        return self.map(lambda t: t[idx], lambda m: m[idx])

    def repeat_interleave(self, repeats: int | Tensor) -> TokenSets:
        """Each batch row repeated ``repeats`` times in place (``Tensor.repeat_interleave(repeats, dim=0)``)."""
        return self.map(lambda t: t.repeat_interleave(repeats, dim=0), lambda m: m.repeat_interleave(repeats, dim=0))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TokenSets:
        """Tokens moved to ``device`` and cast to ``dtype``; masks only moved (they stay bool)."""
        return self.map(lambda t: t.to(device=device, dtype=dtype), lambda m: m.to(device=device))


Condition = Tensor | TokenSets | None
"""What samplers and objectives pass to the network as ``cond``."""


def cond_batch_size(cond: Condition) -> int | None:
    """Batch size of a condition (None for no condition)."""
    if cond is None:
        return None
    return cond.batch_size if isinstance(cond, TokenSets) else cond.shape[0]


def cond_index(cond: Condition, idx: Tensor | slice | int | list[int]) -> Condition:
    """Rows ``idx`` of a condition's batch; an int index keeps the batch dimension."""
    if cond is None:
        return None
    if isinstance(cond, TokenSets):
        return cond.index(idx)
    if isinstance(idx, int):
        return cond[idx : idx + 1] if idx != -1 else cond[-1:]
    return cond[idx]


def cond_repeat_interleave(cond: Condition, repeats: int | Tensor) -> Condition:
    """Each batch row repeated ``repeats`` times in place, e.g. one scene for ``n`` candidate samples."""
    if cond is None:
        return None
    if isinstance(cond, TokenSets):
        return cond.repeat_interleave(repeats)
    return cond.repeat_interleave(repeats, dim=0)


def cond_to(cond: Condition, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Condition:
    """A condition moved to ``device`` and cast to ``dtype`` (masks stay bool)."""
    if cond is None:
        return None
    return cond.to(device=device, dtype=dtype)
