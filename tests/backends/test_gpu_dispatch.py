"""The measured-speed dispatch table: shape classes, defaults, loading, and the choice it makes."""

from __future__ import annotations

import json

import pytest
import torch

from supsup_fast.backends import gpu_dispatch as gd


def _x(m, k=8, dtype=torch.float16):
    return torch.empty(m, k, dtype=dtype)


def test_shape_classes():
    assert gd.shape_class("masked_linear", (_x(1),)) == "f16:m<=1"
    assert gd.shape_class("masked_linear", (_x(17, dtype=torch.bfloat16),)) == "f16:m<=64"
    assert gd.shape_class("masked_linear", (_x(5000, dtype=torch.float32),)) == "f32:m>4096"
    assert gd.shape_class("masked_linear", (torch.empty(2, 3, 8),)) == "f32:m<=16"  # leading dims are rows
    bank = torch.empty(300, 10, 4, dtype=torch.int32)
    assert gd.shape_class("superpose", (torch.empty(10, 100), bank)) == "t>256:n<1M"
    assert gd.shape_class("pack_masks", (torch.empty(2048, 1024, dtype=torch.bool),)) == "n<64M"


def test_defaults_follow_the_documented_cuts():
    assert gd._default("masked_linear", "f16:m<=1024") == "fused"
    assert gd._default("masked_linear", "f16:m<=4096") == "two_pass"
    assert gd._default("masked_linear", "f16:m>4096") == "two_pass"
    assert gd._default("masked_linear", "f32:m<=64") == "fused"
    assert gd._default("masked_linear", "f32:m<=256") == "two_pass"
    assert gd._default("masked_linear_grad_input", "f16:m<=1") == "fused"
    assert gd._default("superpose", "t<=16:n<1M") == "cuda"
    assert gd._default("unpack_masks", "n<1M") == "triton"
    # every op a GPU backend serves has a default for every class
    for op in ("masked_linear", "masked_linear_grad_input"):
        for fam in ("f16", "f32"):
            for m in (1, 16, 64, 256, 1024, 4096, 10**6):
                x = _x(m, dtype=torch.float16 if fam == "f16" else torch.float32)
                assert gd._default(op, gd.shape_class(op, (x,)))


def test_choose_from_picks_the_fastest_candidate():
    assert gd.choose_from({"fused": 9.0, "two_pass": 30.0}, ("fused", "two_pass")) == "fused"
    assert gd.choose_from({"fused": 9.0, "two_pass": 3.0}, ("fused", "two_pass")) == "two_pass"
    assert gd.choose_from({"cuda": 1.0}, ("triton",)) is None
    assert gd.choose_from(None, ("cuda",)) is None


def _table(tmp_path, classes, fmt=gd.FORMAT):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"format": fmt, "device": "Test GPU", "classes": classes}))
    return path


def test_load_table_validates(tmp_path):
    good = _table(tmp_path, {"mask_dots": {"t<=16:n<1M": {"cuda": 5.0, "triton": 2.0}}})
    assert gd.load_table(good)["classes"]["mask_dots"]["t<=16:n<1M"]["triton"] == 2.0
    with pytest.raises(ValueError, match="not a"):
        gd.load_table(_table(tmp_path, {}, fmt="other/1"))
    with pytest.raises(ValueError, match="positive"):
        gd.load_table(_table(tmp_path, {"mask_dots": {"t<=16:n<1M": {"cuda": -1}}}))


def test_measured_table_overrides_the_default(tmp_path, monkeypatch):
    tab = gd.load_table(_table(tmp_path, {"masked_linear": {"f16:m<=16": {"fused": 40.0, "two_pass": 20.0}}}))
    monkeypatch.setattr(gd, "table", lambda device: tab)
    gd.reset()
    assert gd.preferred("masked_linear", (_x(10),), ("fused", "two_pass")) == "two_pass"  # measured
    assert gd.preferred("masked_linear", (_x(200),), ("fused", "two_pass")) == "fused"  # unmeasured: default
    assert gd.preferred("superpose", (torch.empty(4, 4), torch.empty(3, 4, 1, dtype=torch.int32)),
                        ("cuda", "triton")) == "cuda"
    assert gd.preferred("masked_linear", (_x(10),), ("fused", "two_pass")) == "two_pass"  # memoised
    gd.reset()


def test_env_table_is_read(tmp_path, monkeypatch):
    path = _table(tmp_path, {"pack_masks": {"n<1M": {"cuda": 1.0, "triton": 2.0}}})
    monkeypatch.setenv(gd.ENV_TABLE, str(path))
    gd.reset()
    try:
        assert gd._table_for("Any GPU")["device"] == "Test GPU"
    finally:
        monkeypatch.delenv(gd.ENV_TABLE)
        gd.reset()
    assert gd.device_slug("NVIDIA H200") == "nvidia-h200"


def test_providers_route_to_the_chosen_implementation(monkeypatch):
    calls = []
    fused = lambda *a: calls.append("fused") or torch.zeros(1)  # noqa: E731
    lin = gd.linear_provider(fused, lambda w, m: w)
    x = _x(4, dtype=torch.float32)
    lin(x, torch.ones(3, 8), None)  # CPU tensors: always the fused kernel (the interpreter tests it)
    assert calls == ["fused"]
