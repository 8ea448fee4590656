"""Straight-through binarisers: real-valued scores ``S`` -> a 0/1 supermask ``M``.

Both return a float mask (``S``'s dtype) whose backward is the straight-through estimator:
the gradient reaching ``M`` is passed on as if ``M`` were the identity of its input.

* :func:`threshold_mask` -- ``M = [S >= 0]``; ``dM/dS = 1``.
* :func:`topk_mask` -- edge-popup: keep the ``density`` fraction of weights with the largest
  ``|S|``. The selection is a function of ``|S|``, so the straight-through estimator passes the
  gradient to ``|S|`` and the chain rule multiplies it by ``sign(S)``: ``dM/dS = sign(S)``.
  This is deliberate (the official code computes the same via ``scores.abs()``): a gradient
  step that should keep a weight must grow ``|S|`` whatever the score's sign. Passing the
  gradient to ``S`` unchanged would push a negative score towards zero -- out of the top-k --
  exactly when the loss asks for the weight. (``sign(0) = 0``: a score of exactly zero gets no
  gradient; Kaiming-uniform scores are never exactly zero.)

How the layers use them (one packed-mask op per layer, yet exact STE gradients)::

    words = binarise_words(scores, "topk", density)  # the packed mask, selected on |S|
    y = ops.masked_linear(x, W, words, b, scores=scores, score_sign=straight_through_sign("topk"))

``ops.masked_linear``'s gradient for its ``scores`` argument is ``(dL/dy^T x) * W`` -- exactly
``dL/dM`` for ``y = x (W*M)^T`` -- times the binariser's straight-through derivative: ``1`` for
threshold, ``sign(S)`` for top-k (``score_sign``; on CPU folded into the weight-gradient GEMM's
epilogue). That is the gradient ``scores=binarise(S)`` gives, without a float mask or an extra pass.
"""

from __future__ import annotations

import torch

from . import ops
from .errors import SupsupError


def kept_count(numel: int, density: float) -> int:
    """How many weights top-k keeps: ``numel - floor((1 - density) * numel)`` (edge-popup's count).

    At least one weight is kept for any ``density > 0``; ``density = 1`` keeps all.
    """
    if not (0.0 < density <= 1.0):
        raise SupsupError(f"density is the fraction of weights kept and must be in (0, 1], got {density}")
    return int(numel) - int((1.0 - float(density)) * int(numel))


class _TopKStraightThrough(torch.autograd.Function):
    """Forward: 1 on the ``k`` largest entries of ``magnitude``; backward: identity."""

    @staticmethod
    def forward(ctx, magnitude: torch.Tensor, k: int) -> torch.Tensor:
        return ops.largest_k(magnitude.reshape(-1), k).to(magnitude.dtype).reshape(magnitude.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _ThresholdStraightThrough(torch.autograd.Function):
    """Forward: ``[S >= 0]``; backward: identity."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor) -> torch.Tensor:
        return (scores >= 0).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad


def topk_mask(scores: torch.Tensor, density: float) -> torch.Tensor:
    """Edge-popup mask: 1 on the ``kept_count(numel, density)`` entries with the largest ``|S|``.

    Straight-through with ``dM/dS = sign(S)`` (see the module docstring).
    """
    if not scores.is_floating_point():
        raise SupsupError(f"scores must be a floating tensor, got {scores.dtype}")
    return _TopKStraightThrough.apply(scores.abs(), kept_count(scores.numel(), density))


def threshold_mask(scores: torch.Tensor) -> torch.Tensor:
    """Threshold mask ``M = [S >= 0]``, straight-through with ``dM/dS = 1``."""
    if not scores.is_floating_point():
        raise SupsupError(f"scores must be a floating tensor, got {scores.dtype}")
    return _ThresholdStraightThrough.apply(scores)


def binarise_words(scores: torch.Tensor, binariser: str, density: float = 1.0) -> torch.Tensor:
    """The mask of ``scores``, packed: int32 words ``[N, ceil(K/32)]`` of the ``[N, K]`` view
    (:mod:`supsup_fast.format`), with no float mask in between.

    Pass ``scores`` with ``score_sign=straight_through_sign(binariser)`` to the packed-mask ops
    and autograd gives ``S`` the same gradient as through :func:`binarise`. The selection is the
    ``threshold_words`` / ``topk_words`` op (on the compiled CPU backend one pass that selects and
    packs; top-k there is a sample select, see ``csrc/cpu/binarize.cpp``).
    """
    if not scores.is_floating_point():
        raise SupsupError(f"scores must be a floating tensor, got {scores.dtype}")
    if scores.dim() < 1:
        raise SupsupError("scores must have at least one dim [N, ...]")
    flat = scores.detach().reshape(scores.shape[0], -1)
    if binariser == "threshold":
        return ops.threshold_words(flat)
    if binariser == "topk":
        return ops.topk_words(flat, kept_count(flat.numel(), density))  # |S| is formed inside the selection
    raise SupsupError(f"unknown binariser {binariser!r}; expected 'topk' or 'threshold'")


def straight_through_sign(binariser: str) -> bool:
    """Whether the binariser's straight-through derivative is ``sign(S)`` (top-k, a function of
    ``|S|``) rather than ``1`` (threshold): the packed-mask ops' ``score_sign`` argument."""
    if binariser not in ("topk", "threshold"):
        raise SupsupError(f"unknown binariser {binariser!r}; expected 'topk' or 'threshold'")
    return binariser == "topk"


def binarise(scores: torch.Tensor, binariser: str, density: float = 1.0) -> torch.Tensor:
    """Dispatch on a :class:`~supsup_fast.config.SupsupConfig` binariser name."""
    if binariser == "topk":
        return topk_mask(scores, density)
    if binariser == "threshold":
        return threshold_mask(scores)
    raise SupsupError(f"unknown binariser {binariser!r}; expected 'topk' or 'threshold'")
