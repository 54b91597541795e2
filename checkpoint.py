"""Strict checkpoint checking: a published file must match the module exactly.

A loader that silently skips or invents tensors produces a model that runs and speaks
nonsense, so every mismatch is an error that names the tensors involved.
"""

from collections.abc import Mapping

import torch


class CheckpointError(ValueError):
    """A checkpoint does not match the architecture it is loaded into."""


def verify_state_dict(
    expected: Mapping[str, torch.Size | tuple[int, ...]],
    state: Mapping[str, torch.Tensor],
    source: str = "checkpoint",
) -> None:
    """Raise CheckpointError unless ``state`` has exactly the ``expected`` names and shapes."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(
        f"{name} (file {tuple(state[name].shape)}, model {tuple(expected[name])})"
        for name in set(expected) & set(state)
        if tuple(state[name].shape) != tuple(expected[name])
    )
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped tensors: {', '.join(misshaped)}")
    if problems:
        raise CheckpointError(f"{source} does not match the model: " + "; ".join(problems))
