"""SupsupConfig: every field checked (type, range, finite), also when assigned; one name for each base seed."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from supsup_fast import base_weights, ops, reference
from supsup_fast.config import SEED_RANGE, SupsupConfig, check_seed
from supsup_fast.errors import SupsupError
from supsup_fast.nn import MaskedConv2d, MaskedLinear

BAD = {
    "density": [0, -0.1, 1.5, math.nan, math.inf, True, "0.5", None, [0.5]],
    "binariser": ["top-k", "", None, 1, ["topk"]],
    "density_schedule": ["ER", None, 0],
    "erdos_renyi_scale": [0, -1.0, math.inf, math.nan, True, "x", [1.0]],
    "base": ["random", None],
    "seed": [-1, 2**32, -2**32, 2**40, 1.0, True, "0", None, np.float64(3.0)],
    "gain": [0, -1.0, math.inf, -math.inf, math.nan, True, "1", None],
    "score_init": ["zeros", None],
    "keep_bias": [1, 0, "no", np.bool_(True)],  # None is the default: resolved by the base
    "per_task_norm": [1, "yes", None],
    "max_tasks": [0, -3, True, False, 2.0, "4", math.inf],
}


@pytest.mark.parametrize("field,value", [(f, v) for f, vs in BAD.items() for v in vs])
def test_bad_field_is_refused_naming_it(field, value):
    with pytest.raises(SupsupError, match=f"SupsupConfig.{field} must be"):
        SupsupConfig(**{field: value})


def test_good_values_are_stored_as_plain_numbers():
    cfg = SupsupConfig(density=np.float32(0.25), seed=np.int64(7), gain=2, erdos_renyi_scale=np.float64(1.5),
                       max_tasks=np.int32(3))
    assert (cfg.density, cfg.seed, cfg.gain, cfg.erdos_renyi_scale, cfg.max_tasks) == (0.25, 7, 2.0, 1.5, 3)
    assert [type(v) for v in (cfg.density, cfg.seed, cfg.gain, cfg.erdos_renyi_scale, cfg.max_tasks)] == \
        [float, int, float, float, int]
    assert SupsupConfig(seed=2**32 - 1).seed == 2**32 - 1


def test_assignment_is_checked_and_a_refused_value_is_not_kept():
    cfg = SupsupConfig(seed=3)
    for field, value in (("gain", math.inf), ("max_tasks", True), ("seed", 2**32), ("density_schedule", "x")):
        with pytest.raises(SupsupError, match=field):
            setattr(cfg, field, value)
    assert cfg == SupsupConfig(seed=3)
    cfg.density = 1
    assert cfg.density == 1.0 and type(cfg.density) is float
    with pytest.raises(SupsupError, match="Erdős"):  # the cross-field rule holds on assignment too
        cfg.density_schedule = "erdos_renyi"
    assert cfg.density_schedule == "uniform"


def test_keep_bias_none_resolves_by_the_base():
    assert SupsupConfig().keep_bias is False and SupsupConfig(base="pretrained").keep_bias is True
    assert SupsupConfig(base="pretrained", keep_bias=False).keep_bias is False
    cfg = SupsupConfig(base="pretrained")
    cfg.keep_bias = None  # assigned later: resolved the same way
    assert cfg.keep_bias is True


# ---- seeds: one base, one name -------------------------------------------------------------
OUT_OF_RANGE = [-1, 2**32, -2**32, 2**32 + 5, 2**63 - 1]


@pytest.mark.parametrize("seed", OUT_OF_RANGE)
def test_out_of_range_seed_is_refused_everywhere_a_seed_is_taken(seed):
    """Seeds the hash would read as ``seed % 2**32`` (``0``, ``2**32`` and ``-2**32`` all gave one base under
    three names, whose banks refused each other): refused by the config, the layers, the base and the ops."""
    with pytest.raises(SupsupError, match=r"\[0, 2\*\*32\)"):
        SupsupConfig(seed=seed)
    with pytest.raises(SupsupError, match="layer_id"):
        MaskedLinear(4, 3, layer_id=seed)
    with pytest.raises(SupsupError, match="layer_id"):
        MaskedConv2d(2, 3, 3, layer_id=seed)
    with pytest.raises(SupsupError, match="seed"):
        base_weights.signed_constant(seed, 0, (3, 4))
    with pytest.raises(SupsupError, match="layer"):
        base_weights.signed_constant(0, seed, (3, 4))
    out = torch.empty(3, 40)
    x, words = torch.randn(2, 40), torch.zeros(3, 2, dtype=torch.int32)
    for call in (lambda: ops.signed_constant_fill_(out, seed, 0, 1.0),
                 lambda: ops.signed_constant_fill_(out, 0, seed, 1.0),
                 lambda: ops.masked_linear_seeded(x, words, seed, 0, 1.0),
                 lambda: ops.masked_linear_seeded(x, words, 0, seed, 1.0)):
        with pytest.raises(SupsupError, match=r"\[0, 2\*\*32\)"):
            call()
    if seed < 2**63:  # the schemas' int64: calls through torch.ops are checked the same way
        with pytest.raises(SupsupError, match=r"\[0, 2\*\*32\)"):
            torch.ops.supsup_fast.signed_constant_fill_(out, seed, 0, 1.0)
        with pytest.raises(SupsupError, match=r"\[0, 2\*\*32\)"):
            torch.ops.supsup_fast.masked_linear_seeded(x, words, 0, seed, 1.0, None)


@pytest.mark.parametrize("seed", [0, 1, 2**31, 2**32 - 1])
def test_seeds_at_the_ends_of_the_range_regenerate_the_reference_base(seed):
    assert check_seed(seed) == seed and SEED_RANGE == (0, 2**32)
    for version in (1, 2):
        want = reference.signed_constant(seed, 2**32 - 1, (5, 33), format_version=version)
        assert torch.equal(base_weights.signed_constant(seed, 2**32 - 1, (5, 33), format_version=version), want)
    assert torch.equal(base_weights.signed_constant(seed, 2**32 - 1, (5, 33)), want)  # format 2 is the default
    want = reference.signed_constant(seed, 2**32 - 1, (5, 33), format_version=1)
    out = torch.empty(5, 33)  # the signed_constant_fill_ op is format 1
    torch.ops.supsup_fast.signed_constant_fill_(out, seed, 2**32 - 1, math.sqrt(2.0) / math.sqrt(33))
    assert torch.equal(out, want)
