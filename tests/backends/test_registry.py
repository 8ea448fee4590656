"""The registry reaches every computation: a whole converted model -- construction, a training step of
both binarisers, freezing, task inference in both batch modes, grouped classification -- runs on the
forced reference backend without touching a compiled kernel, and agrees with the automatic choice."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import supsup_fast as sf
from supsup_fast import inference, info, ops
from supsup_fast._native import EXT_LOADED
from supsup_fast.ops import _registry

needs_ext = pytest.mark.skipif(not EXT_LOADED, reason="compiled extension not loaded")


def _model(binariser: str) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 6 * 6, 40, bias=False), nn.ReLU(), nn.Linear(40, 12, bias=False),
    )
    return sf.convert_(model, sf.SupsupConfig(binariser=binariser, density=0.3, seed=3))


def _run(binariser: str) -> dict:
    """Everything a user does with a model, with fixed seeds: its results."""
    model = _model(binariser)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 1, 6, 6, generator=gen), torch.randint(0, 10, (16,), generator=gen)
    out = {"base": [m.weight.clone() for m in model.modules() if isinstance(m, sf.MaskedLayerBase)]}
    grads = []
    for t in range(3):
        sf.begin_task(model)
        model.train()
        with torch.no_grad():
            for p in sf.task_parameters(model):
                p.normal_(generator=gen)
        loss = F.cross_entropy(model(x + t), y)
        loss.backward()
        grads.append([p.grad.clone() for p in sf.task_parameters(model)])
        sf.freeze_task(model)
    out["grads"] = grads
    out["banks"] = [m.bank.clone() for m in model.modules() if isinstance(m, sf.MaskedLayerBase)]
    model.eval()
    for mode in ("batch", "per_example"):
        for method in ("one_shot", "binary"):
            r = inference.infer_task(model, x, method=method, objective="g", num_real=10, batch_mode=mode)
            out[f"{mode}-{method}"] = r.task_ids
    out["classes"] = inference.classify(model, x, torch.arange(16) % 3)
    return out


@needs_ext
@pytest.mark.parametrize("binariser", ["topk", "threshold"])
def test_forced_reference_runs_a_whole_model_without_a_compiled_kernel(binariser, monkeypatch):
    cpu = ops.get_backend("cpu_ext")
    native = _run(binariser)
    called = []

    def spy(op):
        def run(*args):
            called.append(op)
            raise AssertionError(f"compiled kernel {op} called under force_backend('reference')")
        return run

    monkeypatch.setattr(cpu, "impls", {op: spy(op) for op in cpu.impls})
    _registry._clear_choice_caches()
    try:
        with ops.force_backend("reference"):
            forced = _run(binariser)
        assert called == []
        with pytest.raises(AssertionError, match="compiled kernel"):  # the spy does stand in the way otherwise
            _run(binariser)
    finally:
        _registry._clear_choice_caches()
    for a, b in zip(native["base"], forced["base"]):
        assert torch.equal(a, b)
    for ga, gb in zip(native["grads"], forced["grads"]):
        for a, b in zip(ga, gb):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(native["banks"], forced["banks"]):
        assert torch.equal(a, b)  # the same selections, bit for bit
    for key in ("batch-one_shot", "batch-binary", "per_example-one_shot", "per_example-binary", "classes"):
        assert torch.equal(native[key], forced[key]), key


def test_info_lists_every_dispatched_op():
    table = info.collect()["ops"]
    assert {k.split("@")[0] for k in table} == set(ops.op_names())
    assert "largest_k@cpu" in table and "signed_constant_fill_@cpu" in table


def test_every_backend_implements_only_declared_ops():
    for b in ops.backends():
        assert set(b.impls) <= set(ops.op_names()), b.name
        assert set(b.checks) <= set(b.impls), b.name


def test_registering_an_undeclared_op_is_refused():
    with pytest.raises(sf.BackendError, match="undeclared ops"):
        ops.register_backend(ops.Backend(name="bogus", priority=-1, devices=("cpu",), impls={"nope": lambda: None}))


def test_declines_name_every_reason():
    with ops.force_backend("largest_k=cpu_ext"):
        if EXT_LOADED:
            with pytest.raises(sf.BackendError, match="cpu_ext does not support dtype torch.float64 for largest_k"):
                ops.largest_k(torch.randn(10, dtype=torch.float64), 3)
    with pytest.raises(sf.BackendError, match="unknown backend 'nonesuch'"):
        with ops.force_backend("nonesuch"):
            ops.pack_masks(torch.ones(2, 3))
