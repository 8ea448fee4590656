"""The objectives task inference minimises over the superposed network's output.

* Entropy: ``H = -sum_j p_j log p_j`` with ``p = softmax(z)``: a mask that fits the input makes
  the output confident (low entropy).
* The G objective (the paper's, for networks with superfluous output neurons beyond the ``num_real``
  real classes): ``G = logsumexp(z_hat)`` with ``z_hat_j = stop_gradient(z_j)`` for the real classes
  and ``z_j`` for the superfluous ones, so ``dG/dz_j = softmax(z)_j`` on superfluous neurons and 0 on
  real ones -- the direction cross-entropy training pushed them in.

Each comes per row (``*_rows``: ``[B, C] -> [B]``, what per-example inference sums) and as the
batch mean (:func:`entropy`, :func:`g_objective`).

The shortlist method compares candidates by a *value* of each one's own output, lower is better
(:func:`score_rows`): the entropy, or the negated logit margin ``-(z_(1) - z_(2))`` (top logit
minus the runner-up). Averaged over a batch the margin separates RotatedMNIST's neighbouring
angles at FC-1024 where the entropy does not (the entropy of the real classes' logits alone does
no better); one row's margin is a single gap, noisier than its entropy (``"auto"``: the margin
for a mean over rows, the entropy for one row).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .errors import SupsupError

OBJECTIVES = ("entropy", "g")
SHORTLIST_SCORES = ("auto", "entropy", "margin")


def entropy_rows(logits: torch.Tensor) -> torch.Tensor:
    """Output entropy of every row: ``-sum_j p_j log p_j``, ``p = softmax(logits)`` -> ``[R]``."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def g_rows(logits: torch.Tensor, num_real: int) -> torch.Tensor:
    """The G objective of every row: ``logsumexp(z_hat)`` with the real classes' logits detached."""
    z = logits.float()
    z_hat = torch.cat([z[..., :num_real].detach(), z[..., num_real:]], dim=-1)
    return torch.logsumexp(z_hat, dim=-1)


def margin_rows(logits: torch.Tensor) -> torch.Tensor:
    """Logit margin of every row: the top logit minus the second -> ``[R]`` (needs >= 2 outputs)."""
    if logits.shape[-1] < 2:
        raise SupsupError(f"the logit margin needs at least 2 outputs, got {logits.shape[-1]}")
    top = torch.topk(logits.float(), 2, dim=-1).values
    return top[..., 0] - top[..., 1]


def score_rows(score: str, *, one_row: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    """The per-row value the shortlist compares candidates by, lower is better: ``"entropy"``, ``"margin"``,
    or ``"auto"``: the entropy when a score is one row's (``one_row``), the margin for a mean over rows."""
    if score == "auto":
        score = "entropy" if one_row else "margin"
    if score == "entropy":
        return entropy_rows
    if score == "margin":
        return lambda logits: -margin_rows(logits)
    raise SupsupError(f"unknown shortlist score {score!r}; expected one of {SHORTLIST_SCORES}")


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """``H`` averaged over rows."""
    return entropy_rows(logits).mean()


def g_objective(logits: torch.Tensor, num_real: int) -> torch.Tensor:
    """The G objective averaged over rows."""
    return g_rows(logits, num_real).mean()


def objective_rows(objective: str, num_real: Optional[int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The per-row objective named ``objective`` (``"entropy"``, or ``"g"`` with ``num_real``)."""
    if objective == "entropy":
        return entropy_rows
    if objective == "g":
        if num_real is None or isinstance(num_real, bool) or not isinstance(num_real, int) or num_real < 1:
            raise SupsupError(f"the G objective needs num_real, the number of real classes (>= 1), got {num_real!r}")
        return lambda logits: _checked_g(logits, num_real)
    raise SupsupError(f"unknown objective {objective!r}; expected one of {OBJECTIVES}")


def _checked_g(logits: torch.Tensor, num_real: int) -> torch.Tensor:
    if num_real >= logits.shape[-1]:
        raise SupsupError(
            f"the G objective needs superfluous output neurons: num_real={num_real} but the model has only "
            f"{logits.shape[-1]} outputs"
        )
    return g_rows(logits, num_real)
