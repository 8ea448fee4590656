"""Masked layers over a seed-format-2 base: the ternary kernel serves their task forward.

What is checked: the config field and what refuses it; the base weights of both formats; that a
float32 CPU ``MaskedLinear`` in task mode runs ``ternary_linear`` (its dense weight absent before and
after) for up to ``TERNARY_MAX_ROWS`` rows and the masked GEMM beyond; that both agree with the
float64 product of ``W * M`` within the float32 tolerance of :mod:`supsup_fast.testing` (the two
sum in different orders, so they are not bit-identical; the masked path above the crossover is the
same kernel as before, bit for bit); gradients to ``x`` and a frozen bias; other modes, dtypes and
format 1 unchanged; state dicts and banks refuse a model of the other format.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import supsup_fast as sf
from supsup_fast import MaskedConv2d, MaskedLinear, SupsupConfig, SupsupError, ops, seed_format, testing
from supsup_fast._native import EXT_LOADED
from supsup_fast.errors import BankFileError
from supsup_fast.nn import masked

needs_ext = pytest.mark.skipif(not EXT_LOADED, reason="compiled extension not loaded")
V2 = SupsupConfig(seed_format=2, density=0.4)


def _layer(cfg=V2, n=37, k=70, tasks=3, bias=False, dtype=torch.float32):
    layer = MaskedLinear(k, n, bias=bias, config=cfg, layer_id=5, dtype=dtype,
                         bias_value=torch.randn(n, dtype=dtype) if bias else None)
    for _ in range(tasks):
        layer.begin_task()
        with torch.no_grad():
            layer.scores.normal_()
        layer.freeze_task()
    return layer


def _exact(layer, x, t):
    w = layer.weight.double() * layer.task_mask(t).double()
    return F.linear(x.double(), w, None if layer.bias is None else layer.bias.double())


def test_config_field_is_validated():
    assert SupsupConfig().seed_format == 2 and SupsupConfig(seed_format=1).seed_format == 1
    for bad in (0, 3, 2.0, "2", True, None):
        with pytest.raises(SupsupError, match="SupsupConfig.seed_format must be one of"):
            SupsupConfig(seed_format=bad)
    cfg = SupsupConfig()
    with pytest.raises(SupsupError, match="seed_format"):
        cfg.seed_format = 5
    assert cfg.seed_format == 2


@pytest.mark.parametrize("version", [1, 2])
def test_base_is_the_seed_formats_constant(version):
    cfg = SupsupConfig(seed_format=version, seed=2**32 - 5)
    layer = MaskedLinear(70, 37, config=cfg, layer_id=5)
    want = seed_format.signed_constant(2**32 - 5, 5, (37, 70), version=version)
    assert torch.equal(layer.weight, want)
    conv = MaskedConv2d(4, 6, 3, config=cfg, layer_id=9)
    assert torch.equal(conv.weight, seed_format.signed_constant(2**32 - 5, 9, (6, 4, 3, 3), version=version))
    assert layer.weight_resident  # read, so regenerated (and kept until the ternary forward drops it)


@needs_ext
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("lead", [(1,), (5,), (2, 3), (masked.TERNARY_MAX_ROWS,)])
@pytest.mark.parametrize("n,k", [(37, 70), (100, 300), (8, 33)])
def test_task_forward_runs_the_ternary_kernel(bias, lead, n, k):
    layer = _layer(n=n, k=k, bias=bias)
    layer.set_task(1)
    x = torch.randn(*lead, k)
    with torch.no_grad():
        y = layer(x)
    assert not layer.weight_resident  # GG inference holds the mask bits only
    words = layer.bank[1]
    assert torch.equal(y, ops.ternary_linear(x, words, 0, 5, math.sqrt(2.0) / math.sqrt(k), layer.bias, 2))
    testing.assert_rel_close(y, _exact(layer, x, 1), torch.float32, what="ternary task forward")
    # the masked GEMM on the materialised weight: the same function, summed in another order
    dense = ops.masked_linear(x, layer.weight, words, layer.bias)
    testing.assert_rel_close(y, dense.double(), torch.float32, what="ternary vs masked")


@needs_ext
def test_more_rows_than_the_crossover_take_the_masked_path():
    layer = _layer()
    layer.set_task(2)
    x = torch.randn(masked.TERNARY_MAX_ROWS + 1, 70)
    with torch.no_grad():
        y = layer(x)
    assert layer.weight_resident
    assert torch.equal(y, ops.masked_linear(x, layer.weight, layer.bank[2], None))
    with torch.no_grad():
        layer(x[:3])
    assert not layer.weight_resident


@needs_ext
def test_gradients_through_the_ternary_forward():
    layer = _layer(bias=True)
    layer.bias.requires_grad_()  # a frozen bias, but gradients to it must still be right
    layer.set_task(0)
    x = torch.randn(4, 70, requires_grad=True)
    gy = torch.randn(4, 37)
    layer(x).backward(gy)
    assert not layer.weight_resident
    w = layer.weight.double() * layer.task_mask(0).double()
    testing.assert_rel_close(x.grad, gy.double() @ w, torch.float32, what="dL/dx")
    testing.assert_rel_close(layer.bias.grad, gy.double().sum(0), torch.float32, what="dL/db")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_other_dtypes_and_modes_keep_the_dense_paths(dtype):
    layer = _layer(dtype=dtype)
    layer.set_task(1)
    x = torch.randn(3, 70, dtype=dtype)
    with torch.no_grad():
        y = layer(x)
    assert layer.weight_resident and layer.weight.dtype == dtype
    assert torch.equal(y, ops.masked_linear(x, layer.weight, layer.bank[1], None))


def test_superposition_and_format_1_unchanged():
    layer = _layer()
    alpha = torch.tensor([0.2, 0.5, 0.3])
    layer.set_superposition(alpha)
    x = torch.randn(2, 70)
    with torch.no_grad():
        y = layer(x)
    assert torch.equal(y, F.linear(x, ops.superpose(layer.weight, layer.bank, alpha)))
    v1 = _layer(SupsupConfig(density=0.4, seed_format=1))
    assert v1.weight_resident and v1.base_id.tolist() == [0, 5]
    v1.set_task(0)
    with torch.no_grad():
        assert torch.equal(v1(x), ops.masked_linear(x, v1.weight, v1.bank[0], None))


def test_to_dtype_regenerates_the_lazy_weight_in_the_new_dtype():
    layer = _layer(tasks=0).double()
    assert not layer.weight_resident and layer.base_scale.dtype == torch.float64
    assert torch.equal(layer.weight, seed_format.signed_constant(0, 5, (37, 70), dtype=torch.float64, version=2))


def test_state_dicts_refuse_the_other_format():
    v1, v2 = _layer(SupsupConfig(density=0.4, seed_format=1)), _layer()
    assert v2.base_id.tolist() == [0, 5, 2]
    with pytest.raises(SupsupError, match="signed-constant base"):
        v2.load_state_dict(v1.state_dict())
    with pytest.raises(SupsupError, match="signed-constant base"):
        v1.load_state_dict(v2.state_dict())
    again = _layer(tasks=0)
    again.load_state_dict(v2.state_dict())
    assert torch.equal(again.bank, v2.bank) and not again.weight_resident


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(20, 16, bias=False), nn.Linear(16, 4, bias=False)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _converted(version):
    model = sf.convert_(_Net(), SupsupConfig(seed_format=version, density=0.5))
    for _ in range(2):
        sf.begin_task(model)
        sf.freeze_task(model)
    return model


@pytest.mark.parametrize("saved,loaded", [(1, 2), (2, 1)])
def test_banks_refuse_a_model_of_the_other_format(tmp_path, saved, loaded):
    from supsup_fast import checkpoint

    checkpoint.save_bank(_converted(saved), tmp_path / "bank")
    with pytest.raises(BankFileError, match=rf"seed_format {saved} in the bank .* SupsupConfig\(seed_format={saved}\)"):
        checkpoint.load_bank(_converted(loaded), tmp_path / "bank")
    same = _converted(saved)
    checkpoint.load_bank(same, tmp_path / "bank")
    sf.set_task(same, 1)
    with torch.no_grad():
        same(torch.randn(3, 20))


def test_banks_load_into_a_format_2_model_without_its_dense_weights(tmp_path):
    """Saving and loading a bank reads a lazy base's signs from its sign words: the layers' dense weights
    are not regenerated, and the signs' digest equals the one of the regenerated weight."""
    from supsup_fast import checkpoint
    from supsup_fast.checkpoint import model_state

    checkpoint.save_bank(_converted(2), tmp_path / "bank")
    fresh = sf.convert_(_Net(), SupsupConfig(seed_format=2, density=0.5))
    linear = [m for m in sf.masked_layers(fresh) if isinstance(m, MaskedLinear)]
    assert linear and not any(m.weight_resident for m in linear)
    checkpoint.load_bank(fresh, tmp_path / "bank")
    assert sf.num_tasks(fresh) == 2 and not any(m.weight_resident for m in linear)
    for m in linear:
        seed, layer_id = (int(v) for v in m.base_id.tolist()[:2])
        lazy = model_state._layer_signs_digest(m, seed, layer_id)
        assert not m.weight_resident
        assert lazy == model_state._signs_digest(m.weight)  # reading .weight regenerates it


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("n,k", [(3, 7), (5, 32), (4, 100), (2, 784), (1, 1), (6, 33), (3, 64)])
def test_sign_words_digest_is_the_weights(version, n, k):
    from supsup_fast.checkpoint import model_state

    weight = seed_format.signed_constant(11, 3, (n, k), version=version)
    words = seed_format.sign_words(11, 3, n, k, version)
    assert model_state._sign_words_digest(words, k) == model_state._signs_digest(weight)


def test_lazy_bank_activates_a_format_2_model_without_its_dense_weights(tmp_path):
    from supsup_fast.checkpoint import LazyBank

    src = _converted(2)
    checkpoint_dir = tmp_path / "bank"
    sf.checkpoint.save_bank(src, checkpoint_dir)
    fresh = sf.convert_(_Net(), SupsupConfig(seed_format=2, density=0.5))
    linear = [m for m in sf.masked_layers(fresh) if isinstance(m, MaskedLinear)]
    bank = LazyBank(checkpoint_dir)
    for t in (1, 0, 1):
        bank.activate(fresh, t)
        assert not any(m.weight_resident for m in linear)
    x = torch.randn(3, 20)
    sf.set_task(src, 1)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), src(x), rtol=0, atol=0)
