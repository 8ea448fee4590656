"""A modern (continuous) Hopfield memory of task masks, on the packed mask format.

Ramsauer et al., "Hopfield Networks is All You Need" (ICLR 2021): with the stored patterns as
the rows of ``X [T, d]`` and a state ``xi [d]``, the energy

    E(xi) = -1/beta * logsumexp(beta X xi) + 1/2 xi^T xi + 1/beta * log T + 1/2 M^2

(``M`` the largest pattern norm, ``sqrt(d)`` for ``{-1, +1}`` patterns) is lowered by the update

    xi <- X^T softmax(beta X xi),

which usually reaches a fixed point next to one stored pattern in one step; the number of
patterns that can be told apart grows exponentially with ``d`` instead of the ``~0.14 d`` of a
classical network.

Here the stored patterns are task masks ``m_t`` held as bits: one int32 row of
``ceil(d / 32)`` words per task, the layout of :mod:`supsup_fast.format`, so the memory costs
``T * d`` bits -- exactly a mask bank -- where a Storkey matrix costs ``32 d^2`` bits whatever
``T``. With ``x_t = 2 m_t - 1``:

* ``X xi = 2 <m_t, xi> - sum(xi)``: :func:`supsup_fast.ops.mask_dots` over the packed rows;
* ``X^T p = 2 sum_t p_t m_t - sum(p)``: :func:`supsup_fast.ops.superpose` with unit weights.

Both ops have autograd, so the energy is differentiable in ``xi`` (its gradient is
``xi - X^T softmax(beta X xi)``) and the memory plugs into :func:`supsup_fast.hopfield.recover`
like a Storkey store: the entropy term drives the query, the energy (:meth:`mask_energy`, its
value on ``{-1, +1}`` patterns) pulls it onto a stored mask.
Its ``filter_gradient(g)`` is ``X^T (X g) / d``, the same two ops: the part of a gradient that
the stored patterns span while they are few (the Hebbian analogue of a Storkey ``Psi g``).
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

from . import ops
from .errors import SupsupError
from .format import words_per_row

__all__ = ["ModernHopfieldMaskMemory"]


class ModernHopfieldMaskMemory:
    """Task masks ``[d]`` stored as bit-packed patterns; retrieval ``X^T softmax(beta X xi)``.

    ``beta`` is the inverse temperature. The default (``None``) follows the number of stored
    patterns: ``beta = 8 ln(T + 1) / d``, so one pattern outweighs all ``T`` others together once
    its similarity to the state leads theirs by ``d / 8`` (its mask agrees with the state on
    1/16 more of the units). Below that lead the weights stay soft: the recovery starts from
    the mean of the stored masks, a state about equally similar to all of them, and a fixed
    ``beta`` large enough for thousands of patterns would commit there to whichever mask the
    first noisy entropy steps happen to favour; a fixed small one cannot single out one
    pattern among thousands. Storage grows by doubling, so ``store`` is amortised O(d).
    """

    def __init__(self, d: int, beta: float | None = None, device=None):
        if not isinstance(d, int) or isinstance(d, bool) or d < 1:
            raise SupsupError(f"d must be an int >= 1, got {d!r}")
        if beta is not None and not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
            raise SupsupError(f"beta must be a finite number > 0 (or None: 8 ln(T + 1) / d), got {beta!r}")
        self.d = d
        self._beta = None if beta is None else float(beta)
        self._words = torch.zeros(8, 1, words_per_row(d), dtype=torch.int32, device=device)
        self._count = 0
        self._pattern_sum = torch.zeros(d, dtype=torch.float32, device=device)

    @property
    def beta(self) -> float:
        """The inverse temperature now: the one given, or ``8 ln(T + 1) / d`` for ``T`` stored patterns."""
        return self._beta if self._beta is not None else 8.0 * math.log(self._count + 1) / self.d

    # ------------------------------------------------------------------ storage
    @property
    def num_stored(self) -> int:
        return self._count

    @property
    def bank(self) -> torch.Tensor:
        """The stored masks as packed words ``[T, 1, ceil(d/32)]`` (one row of bits per task)."""
        return self._words[: self._count]

    @property
    def device(self) -> torch.device:
        return self._words.device

    def _as_masks(self, masks: torch.Tensor, what: str) -> torch.Tensor:
        if not isinstance(masks, torch.Tensor):
            raise SupsupError(f"{what} must be a tensor, got {type(masks).__name__}")
        if masks.shape[-1:] != (self.d,) or masks.dim() not in (1, 2):
            raise SupsupError(f"{what} must have shape [d] or [n, d] with d={self.d}, got {tuple(masks.shape)}")
        if masks.dtype != torch.bool:
            if masks.is_complex() or not bool(((masks == 0) | (masks == 1)).all()):
                raise SupsupError(f"{what} must be bool or hold only 0 and 1")
        return (masks != 0).reshape(-1, self.d).to(self.device)

    @torch.no_grad()
    def store(self, mask: torch.Tensor) -> None:
        """Add one mask ``[d]`` (or several ``[n, d]``) as stored patterns."""
        masks = self._as_masks(mask, "mask")
        n = masks.shape[0]
        if self._count + n > self._words.shape[0]:
            grown = torch.zeros(max(2 * self._words.shape[0], self._count + n), *self._words.shape[1:],
                                dtype=self._words.dtype, device=self.device)
            grown[: self._count] = self._words[: self._count]
            self._words = grown
        self._words[self._count: self._count + n] = ops.pack_masks(masks.unsqueeze(1))
        self._count += n
        self._pattern_sum += (masks.float() * 2 - 1).sum(0)

    def store_all(self, masks: Iterable[torch.Tensor]) -> None:
        for m in masks:
            self.store(m)

    def pattern_mean(self) -> torch.Tensor:
        """Mean of the stored ``{-1, +1}`` patterns (zeros when empty): the recovery start point."""
        return self._pattern_sum / max(self._count, 1)

    def patterns(self) -> torch.Tensor:
        """The stored patterns unpacked, float32 ``{-1, +1}`` ``[T, d]`` (for checks; O(T d) memory)."""
        return ops.unpack_masks(self.bank, self.d, torch.float32).reshape(self._count, self.d) * 2 - 1

    def nbytes(self) -> int:
        """Bytes of the stored patterns: ``T * ceil(d / 32) * 4`` (a packed mask bank)."""
        return self._count * self._words.shape[-1] * self._words.element_size()

    # ------------------------------------------------------------------ retrieval
    def _state(self, xi: torch.Tensor) -> torch.Tensor:
        if not isinstance(xi, torch.Tensor) or not xi.is_floating_point():
            raise SupsupError(f"state must be a floating tensor, got {getattr(xi, 'dtype', type(xi).__name__)}")
        if xi.shape != (self.d,):
            raise SupsupError(f"state must have shape ({self.d},), got {tuple(xi.shape)}")
        if self._count == 0:
            raise SupsupError("the memory holds no patterns yet")
        return xi.to(self.device, torch.float32)

    def similarities(self, xi: torch.Tensor) -> torch.Tensor:
        """``X xi`` ``[T]`` for a state ``[d]``: packed ``mask_dots``; differentiable in ``xi``."""
        xi = self._state(xi)
        return 2 * ops.mask_dots(xi.reshape(1, self.d), self.bank) - xi.sum()

    def weights(self, xi: torch.Tensor) -> torch.Tensor:
        """``softmax(beta X xi)`` ``[T]``: how much each stored pattern takes part in the retrieval."""
        return torch.softmax(self.beta * self.similarities(xi), dim=0)

    def combine(self, p: torch.Tensor) -> torch.Tensor:
        """``X^T p`` ``[d]`` for weights ``p [T]``: packed ``superpose``; differentiable in ``p``."""
        if p.shape != (self._count,):
            raise SupsupError(f"weights must have shape ({self._count},), got {tuple(p.shape)}")
        ones = torch.ones(1, self.d, dtype=torch.float32, device=self.device)
        return 2 * ops.superpose(ones, self.bank, p.to(torch.float32)).reshape(self.d) - p.sum()

    def retrieve(self, xi: torch.Tensor, steps: int = 1) -> torch.Tensor:
        """``steps`` updates ``xi <- X^T softmax(beta X xi)`` from a state ``[d]`` (real values)."""
        if not isinstance(steps, int) or steps < 1:
            raise SupsupError(f"steps must be an int >= 1, got {steps!r}")
        for _ in range(steps):
            xi = self.combine(self.weights(xi))
        return xi

    def recall(self, probe: torch.Tensor, steps: int = 1) -> torch.Tensor:
        """Bool mask(s) retrieved from a binary probe ``[d]`` or ``[n, d]`` (``sign`` of the retrieval)."""
        masks = self._as_masks(probe, "probe")
        with torch.no_grad():
            out = torch.stack([self.retrieve(m.float() * 2 - 1, steps) >= 0 for m in masks])
        return out[0] if probe.dim() == 1 else out

    def energy(self, xi: torch.Tensor) -> torch.Tensor:
        """Ramsauer et al.'s energy of a state ``[d]``; differentiable, ``grad = xi - X^T softmax(beta X xi)``."""
        xi = self._state(xi)
        lse = torch.logsumexp(self.beta * self.similarities(xi), dim=0) / self.beta
        return -lse + 0.5 * (xi * xi).sum() + math.log(self._count) / self.beta + 0.5 * self.d

    def mask_energy(self, x: torch.Tensor) -> torch.Tensor:
        """The energy of a ``{-1, +1}`` mask pattern ``[d]`` as :func:`~supsup_fast.hopfield.recover` descends it.

        Equal in value to :meth:`energy` on such patterns, where ``1/2 xi^T xi = d / 2`` is a
        constant; that term is left out of the graph, so the straight-through gradient is
        ``-X^T softmax(beta X x)``: a pull towards the retrieved pattern that stays on at a stored
        one. With the term in, the gradient ``x - X^T softmax(beta X x)`` vanishes there, and
        the recovery's weight decay and momentum can carry the scores through zero, flipping
        every bit at once.
        """
        x = self._state(x)
        lse = torch.logsumexp(self.beta * self.similarities(x), dim=0) / self.beta
        return -lse + math.log(self._count) / self.beta + self.d  # 1/2 x^T x + 1/2 M^2 = d/2 + d/2

    def filter_gradient(self, g: torch.Tensor) -> torch.Tensor:
        """``X^T (X g) / d``: a score gradient ``[d]`` as the stored patterns see it."""
        with torch.no_grad():
            g = self._state(g)
            return self.combine(self.similarities(g) / self.d)

    def __repr__(self) -> str:
        beta = "8 ln(T + 1) / d" if self._beta is None else f"{self._beta:.4g}"
        return f"ModernHopfieldMaskMemory(d={self.d}, beta={beta}, stored={self._count})"
