"""Named experiment configurations: ``supsup-fast run --preset NAME`` (explicit flags still win).

``rotated-paper`` -- the paper's RotatedMNIST task-inference setting (Wortsman et al. 2020,
Sec. 4.2 / appendix): 36 tasks 10 degrees apart, FC-1024-1024 with 200 outputs (10 real + 190
superfluous), threshold masks, RMSprop lr 1e-4, 1000 batches of 128 per task; task inference
by binary search with the entropy objective over whole test batches of 128 (``--rows all``),
GNu scoring (a batch given the wrong task scores 0); every test image of every task.
"""

from __future__ import annotations

from ..errors import SupsupError

PRESETS: dict[str, dict] = {
    "rotated-paper": dict(
        benchmark="rotated", data="mnist5k", tasks=36, arch="fc1024", outputs=200, binariser="threshold",
        optimizer="rmsprop", lr=1e-4, iterations=1000, batch_size=128, scenario="GNu", method="binary",
        objective="entropy", batch_mode="batch", rows=None, eval_images=1000, test_batch_size=128,
    ),
}


def preset_values(name: str) -> dict:
    """The :class:`~supsup_fast.experiment.ExperimentConfig` fields preset ``name`` sets (a copy)."""
    if name not in PRESETS:
        raise SupsupError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return {**PRESETS[name], "preset": name}


def describe(name: str) -> str:
    """``flag=value`` pairs of a preset, for ``--help``."""
    return ", ".join(f"{k.replace('_', '-')}={'all' if v is None else v}" for k, v in PRESETS[name].items())
