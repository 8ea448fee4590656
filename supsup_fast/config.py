"""How a network is turned into a SupSup network: one validated dataclass.

:func:`supsup_fast.convert.convert_` and the layers in :mod:`supsup_fast.nn` read every choice
from a :class:`SupsupConfig`; nothing else is configured elsewhere.
"""

from __future__ import annotations

import functools
import math
import numbers
import sys
from dataclasses import dataclass
from typing import Optional

from .errors import SupsupError
from .seed_format import DEFAULT_SEED_FORMAT, SEED_FORMAT_VERSIONS

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
        seed: seed of the signed-constant base weights, an int in ``[0, 2**32)`` (:data:`SEED_RANGE`).
        gain: gain of the signed Kaiming constant (``sqrt(2)`` suits ReLU).
        seed_format: how the signed-constant base is regenerated from the seed
            (:mod:`supsup_fast.seed_format`): ``2`` (the default; one hash per 32-weight word) or
            ``1`` (one hash per weight: the default until 2026-12-02, so what banks saved and
            results recorded before then hold; a file records which). With ``2``, a float32
            :class:`~supsup_fast.nn.MaskedLinear` on CPU applying one frozen task to a few rows runs
            the ternary kernel, which reads only the mask words, and its dense weight is
            materialised only when another path needs it (with ``1`` the same kernel hashes every
            weight, 32 hashes a word). The two formats are different bases: a bank records its
            format and refuses a model with the other.
        score_init: ``"kaiming_uniform"`` (``U(+-1/sqrt(fan_in))``) or ``"transfer"`` (a new
            task's scores start at the running mean of the earlier tasks' final scores).
        keep_bias: keep the wrapped layer's bias, frozen. ``None`` (the default) keeps it over a pretrained
            base (the pretrained network is kept whole) and drops it over a signed-constant one (SupSup's own
            networks have none); :func:`~supsup_fast.convert.summary` lists the layers whose bias was dropped.
        per_task_norm: replace BatchNorm by :class:`~supsup_fast.nn.TaskBatchNorm` (running
            statistics per task; shared statistics break every task but the last).
        max_tasks: the most tasks a layer may hold (``None`` = unbounded); beginning one more
            raises :class:`SupsupError`.

    Every field is checked on construction (type, range, finite): a bad value raises
    :class:`SupsupError` naming the field. Booleans are not numbers here (``max_tasks=True`` is refused).
    """

    density: float = 0.5
    binariser: str = "topk"
    density_schedule: str = "uniform"
    erdos_renyi_scale: Optional[float] = None
    base: str = "signed_constant"
    seed: int = 0
    gain: float = math.sqrt(2.0)
    seed_format: int = DEFAULT_SEED_FORMAT
    score_init: str = "kaiming_uniform"
    keep_bias: Optional[bool] = None
    per_task_norm: bool = True
    max_tasks: Optional[int] = None

    def __setattr__(self, name: str, value) -> None:
        # a field assigned after construction is checked like one given to the constructor
        checked = self.__dict__.get("_checked", False)
        old = self.__dict__.get(name)
        object.__setattr__(self, name, value)
        if checked and name in self.__dataclass_fields__:
            try:
                self._validate()
            except SupsupError:
                object.__setattr__(self, name, old)
                raise

    def __post_init__(self) -> None:
        self._validate()
        object.__setattr__(self, "_checked", True)

    def _validate(self) -> None:
        """Check every field (type, range, finite) and store numbers as plain float / int."""
        set_ = functools.partial(object.__setattr__, self)
        set_("density", _real("density", self.density, "the fraction of weights kept, in (0, 1]",
                             lambda v: 0.0 < v <= 1.0))
        _one_of("binariser", self.binariser, BINARISERS)
        _one_of("density_schedule", self.density_schedule, DENSITY_SCHEDULES)
        _one_of("base", self.base, BASES)
        _one_of("score_init", self.score_init, SCORE_INITS)
        if self.erdos_renyi_scale is not None:
            set_("erdos_renyi_scale", _real("erdos_renyi_scale", self.erdos_renyi_scale, "a positive number or None",
                                            lambda v: v > 0.0))
        if (self.density_schedule == "erdos_renyi" and self.erdos_renyi_scale is None
                and self.density > ERDOS_RENYI_CAP):
            raise SupsupError(
                f"SupsupConfig: an Erdős–Rényi budget caps every layer at density {ERDOS_RENYI_CAP}, so an overall "
                f"density of {self.density} cannot be met; lower density or give erdos_renyi_scale"
            )
        set_("seed", check_seed(self.seed, "SupsupConfig.seed"))
        set_("gain", _real("gain", self.gain, "a positive number", lambda v: v > 0.0))
        if not _is_int(self.seed_format) or int(self.seed_format) not in SEED_FORMAT_VERSIONS:
            raise SupsupError(f"SupsupConfig.seed_format must be one of {SEED_FORMAT_VERSIONS} (the seed formats of "
                              f"supsup_fast.seed_format), got {self.seed_format!r}")
        set_("seed_format", int(self.seed_format))
        if self.keep_bias is None:  # resolved once: the pretrained network is kept whole, SupSup's own has no bias
            set_("keep_bias", self.base == "pretrained")
        elif not isinstance(self.keep_bias, bool):
            raise SupsupError(f"SupsupConfig.keep_bias must be True, False or None, got {self.keep_bias!r}")
        _flag("per_task_norm", self.per_task_norm)
        if self.max_tasks is not None:
            if not _is_int(self.max_tasks) or int(self.max_tasks) < 1:
                raise SupsupError(f"SupsupConfig.max_tasks must be a positive int or None, got {self.max_tasks!r}")
            set_("max_tasks", int(self.max_tasks))


#: Seeds of the signed-constant base: the base hash reads 32 bits, so a seed is in ``[0, 2**32)``.
#: Seeds outside would regenerate the weights of ``seed % 2**32`` under another name, and banks of two
#: models with the same weights would refuse each other; they are refused wherever a seed is taken.
SEED_RANGE = (0, 1 << 32)


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, _np_bool_types()))


def check_seed(seed, what: str = "seed") -> int:
    """``seed`` as an ``int`` in :data:`SEED_RANGE`; a :class:`SupsupError` naming ``what`` otherwise."""
    if not _is_int(seed):
        raise SupsupError(f"{what} must be an int in [0, 2**32), got {seed!r}")
    seed = int(seed)
    if not SEED_RANGE[0] <= seed < SEED_RANGE[1]:
        raise SupsupError(f"{what} must be in [0, 2**32) (the base hash uses 32 bits; {seed} % 2**32 = "
                          f"{seed % (1 << 32)} gives these weights), got {seed}")
    return seed


def _one_of(name: str, value, allowed) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise SupsupError(f"SupsupConfig.{name} must be one of {allowed}, got {value!r}")


def _real(name: str, value, what: str, ok) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, (bool, _np_bool_types())):
        raise SupsupError(f"SupsupConfig.{name} must be {what}, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or not ok(v):
        raise SupsupError(f"SupsupConfig.{name} must be {what} (finite), got {value!r}")
    return v


def _flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise SupsupError(f"SupsupConfig.{name} must be True or False, got {value!r}")


def _np_bool_types() -> tuple:
    """numpy's bool type, when numpy is loaded (it is not a ``bool`` subclass, but no number either)."""
    np = sys.modules.get("numpy")
    return (np.bool_,) if np is not None else ()
