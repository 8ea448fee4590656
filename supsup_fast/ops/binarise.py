"""The binarisers' selections as ops: real-valued scores -> a mask, packed as it is selected.

* ``largest_k(a, k, magnitude)`` -- bool mask of the ``k`` largest entries of a flat tensor (of
  ``|a|`` with ``magnitude``), in the IEEE total order (NaN above +inf; with ``magnitude`` the sign
  is ignored, so ``-0 == +0``); ties at the k-th value are taken in index order;
* ``topk_words(S, k)`` -- the edge-popup mask of ``S [N, K]``: ``largest_k`` of ``|S|``, packed;
* ``threshold_words(S)`` -- ``[S >= 0]`` packed (``-0`` kept, NaN not).

They take no gradient: the straight-through estimator is applied by the layer's masked op (see
:mod:`supsup_fast.binarise`).
"""

from __future__ import annotations

import torch

from ..format import words_per_row
from ._checks import check_float, require
from ._define import define, on_first
from ._fastpath import call


def _words_fake(scores, *rest):
    return scores.new_empty((scores.shape[0], words_per_row(scores.shape[1])), dtype=torch.int32)


def _check_k(k, n: int, what: str) -> None:
    require(not isinstance(k, bool) and isinstance(k, int), lambda: f"{what}: k must be an int, got {k!r}")
    require(0 <= k <= n, lambda: f"{what}: k={k} must be in [0, {n}]")


def _check_largest_k(a, k, magnitude=False) -> None:
    check_float("a", a)
    require(a.dim() == 1, lambda: f"largest_k needs a 1-D tensor, got shape {tuple(a.shape)}")
    _check_k(k, a.numel(), "largest_k")


def _check_scores(scores, what: str) -> None:
    check_float("scores", scores)
    require(scores.dim() == 2, lambda: f"{what} needs scores of shape [N, K], got {tuple(scores.shape)}")


def _check_topk_words(scores, k) -> None:
    _check_scores(scores, "topk_words")
    _check_k(k, scores.numel(), "topk_words")


define("largest_k(Tensor a, int k, bool magnitude=False) -> Tensor", dispatch=on_first,
       fake=lambda a, k, magnitude=False: a.new_empty(a.shape, dtype=torch.bool), check=_check_largest_k)
define("topk_words(Tensor scores, int k) -> Tensor", dispatch=on_first, fake=_words_fake, check=_check_topk_words)
define("threshold_words(Tensor scores) -> Tensor", dispatch=on_first, fake=_words_fake,
       check=lambda scores: _check_scores(scores, "threshold_words"))


def largest_k(a: torch.Tensor, k: int, magnitude: bool = False) -> torch.Tensor:
    """Bool mask of the ``k`` largest entries of the 1-D ``a`` (of ``|a|`` with ``magnitude``)."""
    _check_largest_k(a, k)
    return call("largest_k", a, k, bool(magnitude))


def topk_words(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` largest ``|S|`` of ``scores [N, K]`` as packed words ``[N, ceil(K/32)]``."""
    _check_topk_words(scores, k)
    return call("topk_words", scores, k)


def threshold_words(scores: torch.Tensor) -> torch.Tensor:
    """``[S >= 0]`` of ``scores [N, K]`` as packed words ``[N, ceil(K/32)]``."""
    _check_scores(scores, "threshold_words")
    return call("threshold_words", scores)
