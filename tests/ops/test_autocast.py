"""``torch.autocast`` around the masked matmuls behaves like it does around ``F.linear``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from supsup_fast import SupsupError, ops
from supsup_fast import reference as ref


def _inputs(m=6, n=10, k=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g)
    words = ref.pack_masks(torch.rand(n, k, generator=g) < 0.5)
    return x, w, b, words


def test_masked_linear_casts_like_f_linear():
    x, w, b, words = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ops.masked_linear(x, w, words, b)
        want = F.linear(x, ref.apply_mask(w, words), b)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_gradients_flow_back_in_the_original_dtypes():
    x, w, b, words = _inputs(seed=1)
    scores = torch.randn_like(w)
    xx, ss, bb = (t.clone().requires_grad_() for t in (x, scores, b))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ops.masked_linear(xx, w, words, bb, scores=ss)
    y.float().sum().backward()
    assert xx.grad.dtype == ss.grad.dtype == bb.grad.dtype == torch.float32
    # the same gradients as the bf16 computation done by hand
    xb, sb, bbf = (t.detach().to(torch.bfloat16).requires_grad_() for t in (x, scores, b))
    ops.masked_linear(xb, w.to(torch.bfloat16), words, bbf, scores=sb).float().sum().backward()
    torch.testing.assert_close(xx.grad, xb.grad.float())
    torch.testing.assert_close(ss.grad, sb.grad.float())


def test_without_autocast_mixed_dtypes_are_still_an_error():
    x, w, b, words = _inputs(seed=2)
    with pytest.raises(SupsupError, match="dtype"):
        ops.masked_linear(x.to(torch.bfloat16), w, words, b)
