"""How a network is turned into a SupSup network: one validated dataclass.

:func:`supsup_fast.convert.convert_` and the layers in :mod:`supsup_fast.nn` read every choice
from a :class:`SupsupConfig`; nothing else is configured elsewhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from .errors import SupsupError

BINARISERS = ("topk", "threshold")
DENSITY_SCHEDULES = ("uniform", "erdos_renyi")
BASES = ("signed_constant", "pretrained")
SCORE_INITS = ("kaiming_uniform", "transfer")

#: Erdős–Rényi densities are capped here (as in edge-popup / SupSup): no layer keeps more than half.
ERDOS_RENYI_CAP = 0.5


@dataclass
class SupsupConfig:
    """Everything that decides how masks are learned, stored and applied.

    Attributes:
        density: fraction of a layer's weights KEPT by the top-k binariser, in ``(0, 1]``
            (the official code's ``sparsity`` flag means the same thing; the name here says it).
            Ignored by the threshold binariser, whose density is whatever ``S >= 0`` gives.
        binariser: ``"topk"`` (edge-popup: keep the ``density`` fraction with the largest
            ``|S|``) or ``"threshold"`` (``M = S >= 0``, Piggyback-style, used for task inference).
        density_schedule: ``"uniform"`` (every layer keeps ``density``) or ``"erdos_renyi"``
            (layer ``l`` keeps ``min(0.5, erdos_renyi_scale * (c_out + c_in) / (c_out c_in kh kw))``).
        erdos_renyi_scale: the scale ``s`` of the Erdős–Rényi budget. ``None`` solves for the ``s``
            that makes the converted network's overall kept fraction equal ``density``
            (which must then be at most 0.5, the per-layer cap).
        base: ``"signed_constant"`` (every weight ``+-gain/sqrt(fan_in)``, regenerated from
            ``(seed, layer_id)``; only the seed is stored) or ``"pretrained"`` (masks select from
            the wrapped layer's own weight, kept frozen and saved with the model).
        seed: seed of the signed-constant base weights.
        gain: gain of the signed Kaiming constant (``sqrt(2)`` suits ReLU).
        score_init: ``"kaiming_uniform"`` (``U(+-1/sqrt(fan_in))``) or ``"transfer"`` (a new
            task's scores start at the running mean of the earlier tasks' final scores).
        keep_bias: keep the wrapped layer's bias, frozen. ``None`` (the default) keeps it over a pretrained
            base (the pretrained network is kept whole) and drops it over a signed-constant one (SupSup's own
            networks have none); :func:`~supsup_fast.convert.summary` lists the layers whose bias was dropped.
        per_task_norm: replace BatchNorm by :class:`~supsup_fast.nn.TaskBatchNorm` (running
            statistics per task; shared statistics break every task but the last).
        max_tasks: the most tasks a layer may hold (``None`` = unbounded); beginning one more
            raises :class:`SupsupError`.
    """

    density: float = 0.5
    binariser: str = "topk"
    density_schedule: str = "uniform"
    erdos_renyi_scale: Optional[float] = None
    base: str = "signed_constant"
    seed: int = 0
    gain: float = math.sqrt(2.0)
    score_init: str = "kaiming_uniform"
    keep_bias: Optional[bool] = None
    per_task_norm: bool = True
    max_tasks: Optional[int] = None

    def __post_init__(self) -> None:
        def one_of(name: str, value, allowed) -> None:
            if value not in allowed:
                raise SupsupError(f"SupsupConfig.{name} must be one of {allowed}, got {value!r}")

        if isinstance(self.density, bool) or not isinstance(self.density, (int, float)):
            raise SupsupError(f"SupsupConfig.density must be a number in (0, 1], got {self.density!r}")
        if not (0.0 < float(self.density) <= 1.0) or math.isnan(self.density):
            raise SupsupError(f"SupsupConfig.density is the fraction of weights kept and must be in (0, 1], "
                              f"got {self.density}")
        self.density = float(self.density)
        one_of("binariser", self.binariser, BINARISERS)
        one_of("density_schedule", self.density_schedule, DENSITY_SCHEDULES)
        one_of("base", self.base, BASES)
        one_of("score_init", self.score_init, SCORE_INITS)
        if self.erdos_renyi_scale is not None and not (float(self.erdos_renyi_scale) > 0.0):
            raise SupsupError(f"SupsupConfig.erdos_renyi_scale must be positive or None, got {self.erdos_renyi_scale}")
        if (self.density_schedule == "erdos_renyi" and self.erdos_renyi_scale is None
                and self.density > ERDOS_RENYI_CAP):
            raise SupsupError(
                f"SupsupConfig: an Erdős–Rényi budget caps every layer at density {ERDOS_RENYI_CAP}, so an overall "
                f"density of {self.density} cannot be met; lower density or give erdos_renyi_scale"
            )
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise SupsupError(f"SupsupConfig.seed must be an int, got {self.seed!r}")
        if not (float(self.gain) > 0.0):
            raise SupsupError(f"SupsupConfig.gain must be positive, got {self.gain}")
        if self.keep_bias is None:
            self.keep_bias = self.base == "pretrained"
        elif not isinstance(self.keep_bias, bool):
            raise SupsupError(f"SupsupConfig.keep_bias must be True, False or None, got {self.keep_bias!r}")
        if self.max_tasks is not None and (not isinstance(self.max_tasks, int) or self.max_tasks < 1):
            raise SupsupError(f"SupsupConfig.max_tasks must be a positive int or None, got {self.max_tasks!r}")
