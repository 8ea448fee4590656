"""Frameworks keep one optimizer for a whole run; SupSup needs it to train the current task's parameters only."""

from __future__ import annotations

import torch


def point_optimizer(optimizer: torch.optim.Optimizer, params: list) -> None:
    """Make ``params`` the only parameters ``optimizer`` updates (in its first group, with that group's settings;
    other groups are emptied, not removed, so a learning-rate scheduler's per-group lists still fit) and drop its
    state, which belonged to the previous task's parameters."""
    groups = optimizer.param_groups
    if not groups:
        optimizer.add_param_group({"params": list(params)})
        return
    groups[0]["params"] = list(params)
    for g in groups[1:]:
        g["params"] = []
    optimizer.state.clear()
