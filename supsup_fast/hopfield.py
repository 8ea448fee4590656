"""HopSupSup: task masks on hidden units stored in a fixed-size Hopfield network.

Instead of keeping one bit per weight per task, HopSupSup (Wortsman et al., 2020, section 5)
learns a binary mask ``m`` over the ``d`` hidden units of a frozen random network per task,
stores the pattern ``x = 2m - 1`` in the ``d x d`` weights ``Psi`` of a Hopfield network, and
at test time recovers the task's mask from a batch of its data alone: gradient descent on one
score per unit, minimising the output entropy first and the Hopfield energy
``E(s) = -1/2 s^T Psi s`` increasingly towards the end, pulls the scores into the nearest
stored pattern.

Storage rules (``HopfieldMaskStore(rule=...)``):

- ``"storkey"`` (default) -- Storkey (1997) as stated by Storkey & Valabregue (1999):
  ``w_ij += (x_i x_j - x_i h_ji - h_ij x_j) / d`` for ``i != j`` with the local fields
  ``h_ij = sum_{k != i, j} w_ik x_k``; the diagonal stays zero. With ``h = Psi x`` and a
  zero diagonal, ``h_ij = h_i - w_ij x_j``, which gives the vectorised form used here:
  ``Psi += (x x^T - x h^T - h x^T + 2 Psi) / d``, then ``diag(Psi) = 0``.
- ``"simplified"`` -- the form of the paper's code: ``Psi += (x x^T - I - x h^T - h x^T) / d``
  with ``h = Psi x`` including all units (no exclusion, diagonal not zeroed).
- ``"hebbian"`` -- ``Psi += (x x^T - I) / d``; capacity about ``0.138 d``.

Recovery (:func:`recover`) follows the paper's code: scores ``s`` (initialised to the mean of
the stored patterns, which the store keeps as a running sum, or to zeros), a straight-through
threshold ``m = [s >= 0]`` (or ``sigmoid(s)``), loss ``(1 - b/T) H(m) + gamma (b/T) E(2m - 1)``
for steps ``b = 1..T``, SGD with lr 500, momentum 0.9 and weight decay 1e-4, ``gamma = 1.5e-3``.
One change, ``gradient="memory"`` (the default): the objective's gradient reaches the scores
through the memory (``Psi g`` for a Storkey store), not as it is (``gradient="plain"``, the
paper). Most of an entropy gradient points away from every stored mask -- entropy can also be
lowered by masks that are confidently wrong -- and with the energy still weighing little in
the first steps the plain gradient can carry the state out of the right basin; ``Psi g`` keeps
the part a stored mask can follow (``Psi`` is close to the projector onto the stored patterns'
span while they are few).

Any *mask memory* works with :func:`recover` and :func:`recovery_trace`: an object with ``d``,
``pattern_mean()``, ``mask_energy(pattern)`` (the energy of a ``{-1, +1}`` pattern, differentiable)
and ``filter_gradient(g)``:
:class:`HopfieldMaskStore`, :class:`LayeredMaskMemory` (one memory per hidden layer, as the
paper keeps one Hopfield network per masked layer) and
:class:`supsup_fast.modern_hopfield.ModernHopfieldMaskMemory`.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base_weights import signed_constant
from .errors import SupsupError

__all__ = [
    "HopfieldMaskStore",
    "LayeredMaskMemory",
    "recover",
    "GRADIENTS",
    "HiddenMaskedMLP",
    "train_unit_mask",
    "mask_accuracy",
    "recovery_report",
    "recovery_trace",
    "to_pattern",
    "to_mask",
]

_RULES = ("storkey", "simplified", "hebbian")
GRADIENTS = ("memory", "plain")
ACTIVATIONS = ("relu", "swish")
GATES = ("after_activation", "before_activation")


def to_pattern(mask: torch.Tensor) -> torch.Tensor:
    """Binary mask (bool or 0/1) -> float32 pattern in {-1, +1}."""
    return (mask != 0).to(torch.float32) * 2 - 1


def to_mask(pattern: torch.Tensor) -> torch.Tensor:
    """Pattern in {-1, +1} (or any real scores) -> bool mask ``pattern >= 0``."""
    return pattern >= 0


class _SignSTE(torch.autograd.Function):
    """``[s >= 0]`` forward, identity backward (the paper's straight-through threshold)."""

    @staticmethod
    def forward(ctx, s):
        return (s >= 0).to(s.dtype)

    @staticmethod
    def backward(ctx, g):
        return g


def _binary_mask(mask: torch.Tensor, d: int, what: str = "mask") -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise SupsupError(f"{what} must be a tensor, got {type(mask).__name__}")
    if mask.shape[-1:] != (d,):
        raise SupsupError(f"{what} must have last dimension d={d}, got shape {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        if mask.is_floating_point() or mask.dtype in (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64):
            if not bool(((mask == 0) | (mask == 1)).all()):
                raise SupsupError(f"{what} must be bool or hold only 0 and 1")
        else:
            raise SupsupError(f"{what} has unsupported dtype {mask.dtype}")
    return mask != 0


class HopfieldMaskStore(nn.Module):
    """A ``d x d`` float32 Hopfield weight ``Psi`` holding binary masks as ``{-1, +1}`` patterns.

    Its size never grows with the number of tasks: ``d^2`` floats plus a ``d``-vector running
    sum of the patterns (used to initialise recovery) and a counter.
    """

    def __init__(self, d: int, rule: str = "storkey", device=None):
        super().__init__()
        if not isinstance(d, int) or d < 2:
            raise SupsupError(f"d must be an int >= 2, got {d!r}")
        if rule not in _RULES:
            raise SupsupError(f"rule must be one of {_RULES}, got {rule!r}")
        self.d, self.rule = d, rule
        self.register_buffer("psi", torch.zeros(d, d, dtype=torch.float32, device=device))
        self.register_buffer("pattern_sum", torch.zeros(d, dtype=torch.float32, device=device))
        self.register_buffer("num_stored", torch.zeros((), dtype=torch.int64, device=device))

    @torch.no_grad()
    def store(self, mask: torch.Tensor) -> None:
        """Add one binary mask ``[d]`` (bool or 0/1) with the store's learning rule."""
        mask = _binary_mask(mask, self.d)
        if mask.dim() != 1:
            raise SupsupError(f"store() takes one mask [d], got shape {tuple(mask.shape)}")
        x = to_pattern(mask.to(self.psi.device))
        psi, d = self.psi, self.d
        # rank-1 updates in place (addr_): no d x d temporaries, which dominate at d = 2048
        if self.rule == "hebbian":
            psi.addr_(x, x, alpha=1 / d)
            psi.diagonal().sub_(1 / d)
        elif self.rule == "simplified":
            h = psi @ x
            psi.addr_(x, x, alpha=1 / d).addr_(x, h, alpha=-1 / d).addr_(h, x, alpha=-1 / d)
            psi.diagonal().sub_(1 / d)
        else:
            h = psi @ x  # diagonal is zero, so h_i already excludes k = i
            psi.mul_(1 + 2 / d).addr_(x, x, alpha=1 / d).addr_(x, h, alpha=-1 / d).addr_(h, x, alpha=-1 / d)
            psi.fill_diagonal_(0)
        self.pattern_sum += x
        self.num_stored += 1

    def store_all(self, masks: Iterable[torch.Tensor]) -> None:
        for m in masks:
            self.store(m)

    def pattern_mean(self) -> torch.Tensor:
        """Mean of the stored patterns (zeros when empty): the paper's recovery start point."""
        return self.pattern_sum / max(int(self.num_stored), 1)

    def energy(self, s: torch.Tensor) -> torch.Tensor:
        """``-1/2 s^T Psi s`` for a state ``[d]`` (or a batch ``[n, d]`` -> ``[n]``); differentiable."""
        if s.shape[-1:] != (self.d,):
            raise SupsupError(f"state must have last dimension d={self.d}, got shape {tuple(s.shape)}")
        s = s.to(self.psi.dtype)
        return -0.5 * ((s @ self.psi) * s).sum(-1)

    @torch.no_grad()
    def recall(self, probe: torch.Tensor, steps: int = 20, mode: str = "async", seed: int = 0) -> torch.Tensor:
        """Run sign updates from a binary ``probe`` ``[d]`` or ``[n, d]``; returns bool masks.

        ``"async"`` updates units one at a time in a random order per sweep (energy never
        increases, so it reaches a fixed point); ``"sync"`` updates all units at once (fast,
        may end in a 2-cycle). A zero local field keeps the unit's state. Stops early once a
        sweep changes nothing.
        """
        if mode not in ("async", "sync"):
            raise SupsupError(f"mode must be 'async' or 'sync', got {mode!r}")
        if steps < 0:
            raise SupsupError(f"steps must be >= 0, got {steps}")
        single = probe.dim() == 1
        x = to_pattern(_binary_mask(probe, self.d, "probe").to(self.psi.device))
        x = x.unsqueeze(0) if single else x.reshape(-1, self.d).clone()
        psi = self.psi
        gen = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            if mode == "sync":
                h = x @ psi
                new = torch.where(h > 0, 1.0, torch.where(h < 0, -1.0, x))
                changed = bool((new != x).any())
                x = new
            else:
                changed = False
                for i in torch.randperm(self.d, generator=gen).tolist():
                    h = x @ psi[:, i]
                    new = torch.where(h > 0, 1.0, torch.where(h < 0, -1.0, x[:, i]))
                    if bool((new != x[:, i]).any()):
                        changed = True
                        x[:, i] = new
            if not changed:
                break
        out = to_mask(x)
        return out[0] if single else out.reshape(probe.shape)

    def mask_energy(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`energy` of a ``{-1, +1}`` pattern: what :func:`recover` descends."""
        return self.energy(x)

    def filter_gradient(self, g: torch.Tensor) -> torch.Tensor:
        """``Psi g``: a score gradient ``[d]`` as the memory sees it (:func:`recover`, ``gradient="memory"``)."""
        if g.shape != (self.d,):
            raise SupsupError(f"gradient must have shape ({self.d},), got {tuple(g.shape)}")
        return self.psi @ g.to(self.psi.dtype)

    def nbytes(self) -> int:
        """Bytes of the memory's state: the float32 ``d x d`` weights (the running sum aside)."""
        return self.psi.numel() * self.psi.element_size()

    def capacity_hint(self) -> int:
        """Patterns storable with every one a stable fixed point w.h.p. (asymptotic rule of thumb).

        Hebbian ``d / (2 ln d)``; Storkey ``d / sqrt(2 ln d)`` (Storkey, 1997). The looser
        "0.138 d" Hebbian figure allows a small fraction of wrong bits.
        """
        ln = math.log(self.d)
        return int(self.d / (2 * ln)) if self.rule == "hebbian" else int(self.d / math.sqrt(2 * ln))

    def extra_repr(self) -> str:
        return f"d={self.d}, rule={self.rule!r}, stored={int(self.num_stored)}"


class LayeredMaskMemory:
    """One mask memory per hidden layer: a unit mask ``[sum(sizes)]`` is split into the layers'
    chunks, each stored in (and recovered through) its own memory; energies add.

    The paper keeps one Hopfield network per masked layer (two of ``d = 2048`` for its
    784-2048-2048 network): ``2 * 2048^2`` weights instead of one ``4096^2`` matrix.
    """

    def __init__(self, memories: Sequence, sizes: Sequence[int] | None = None):
        memories = list(memories)
        if not memories:
            raise SupsupError("LayeredMaskMemory needs at least one memory")
        sizes = [m.d for m in memories] if sizes is None else [int(v) for v in sizes]
        if sizes != [m.d for m in memories]:
            raise SupsupError(f"sizes {sizes} do not match the memories' d {[m.d for m in memories]}")
        self.memories, self.sizes, self.d = memories, tuple(sizes), sum(sizes)

    @classmethod
    def storkey(cls, sizes: Sequence[int], rule: str = "storkey", device=None) -> "LayeredMaskMemory":
        return cls([HopfieldMaskStore(int(v), rule, device=device) for v in sizes])

    def _split(self, t: torch.Tensor, what: str):
        if t.shape[-1:] != (self.d,):
            raise SupsupError(f"{what} must have last dimension d={self.d}, got shape {tuple(t.shape)}")
        return torch.split(t, self.sizes, dim=-1)

    def store(self, mask: torch.Tensor) -> None:
        mask = _binary_mask(mask, self.d)
        for mem, chunk in zip(self.memories, self._split(mask, "mask")):
            mem.store(chunk)

    def store_all(self, masks: Iterable[torch.Tensor]) -> None:
        for m in masks:
            self.store(m)

    @property
    def num_stored(self) -> int:
        return int(self.memories[0].num_stored)

    def pattern_mean(self) -> torch.Tensor:
        return torch.cat([m.pattern_mean() for m in self.memories])

    def mask_energy(self, x: torch.Tensor) -> torch.Tensor:
        return sum(m.mask_energy(c) for m, c in zip(self.memories, self._split(x, "pattern")))

    def filter_gradient(self, g: torch.Tensor) -> torch.Tensor:
        return torch.cat([m.filter_gradient(c) for m, c in zip(self.memories, self._split(g, "gradient"))])

    def recall(self, probe: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.cat([m.recall(c, **kwargs) for m, c in zip(self.memories, self._split(probe, "probe"))], dim=-1)

    def nbytes(self) -> int:
        return sum(m.nbytes() for m in self.memories)

    def __repr__(self) -> str:
        return f"LayeredMaskMemory({', '.join(repr(m) for m in self.memories)})"


def recover(store, objective_fn: Callable[[torch.Tensor], torch.Tensor], steps: int = 30,
            lr: float = 500.0, momentum: float = 0.9, gamma: float = 1.5e-3, init="mean",
            binarizer: str = "ste", weight_decay: float = 1e-4, gradient: str = "memory",
            on_step: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Recover a stored mask by gradient descent on entropy then memory energy.

    ``store`` is any mask memory (see the module docstring). ``objective_fn(mask)`` gets a
    float mask ``[d]`` (0/1 values with straight-through gradients for ``binarizer="ste"``,
    ``sigmoid(s)`` for ``"sigmoid"``) and returns a scalar, typically the entropy of the model's
    outputs on a batch of the unknown task (it may draw a new batch per call). Step
    ``b = 1..steps`` descends ``(1 - b/steps) * objective + gamma * (b/steps) * E(2 mask - 1)``
    (``E = store.mask_energy``)
    with SGD (``lr``, ``momentum``, ``weight_decay``: the paper's 500, 0.9, 1e-4).
    ``gradient="memory"`` passes the objective's gradient through ``store.filter_gradient``
    before the step; ``"plain"`` uses it as it is (the paper). ``init``: ``"mean"`` (mean stored
    pattern, as in the paper's code), ``"zeros"`` or a ``[d]`` tensor of initial scores.
    ``on_step(b, mask)`` is called after every step with the bool mask of the scores.
    Returns the bool mask ``[d]`` of the final scores.
    """
    if binarizer not in ("ste", "sigmoid"):
        raise SupsupError(f"binarizer must be 'ste' or 'sigmoid', got {binarizer!r}")
    if gradient not in GRADIENTS:
        raise SupsupError(f"gradient must be one of {GRADIENTS}, got {gradient!r}")
    if not isinstance(steps, int) or steps < 1:
        raise SupsupError(f"steps must be an int >= 1, got {steps!r}")
    for name, v in (("lr", lr), ("momentum", momentum), ("gamma", gamma), ("weight_decay", weight_decay)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
            raise SupsupError(f"{name} must be a finite number >= 0, got {v!r}")
    s0 = _initial_scores(store, init)
    scores = s0.detach().clone().float().requires_grad_(True)
    opt = torch.optim.SGD([scores], lr=lr, momentum=momentum, weight_decay=weight_decay)
    for b in range(1, steps + 1):
        frac = b / steps
        mask = _SignSTE.apply(scores) if binarizer == "ste" else torch.sigmoid(scores)
        energy_term = gamma * frac * store.mask_energy(2 * mask - 1)
        grad = (torch.autograd.grad(energy_term, scores, retain_graph=frac < 1)[0] if gamma > 0
                else torch.zeros_like(scores))
        if frac < 1:  # the last step is pure energy: skip an objective that would weigh 0
            objective = objective_fn(mask)
            if not isinstance(objective, torch.Tensor) or objective.numel() != 1:
                raise SupsupError("objective_fn must return a scalar tensor")
            g = torch.autograd.grad((1 - frac) * objective.reshape(()), scores, allow_unused=True)[0]
            if g is not None:
                grad = grad + (store.filter_gradient(g) if gradient == "memory" else g)
        scores.grad = grad.to(scores.dtype)
        opt.step()
        if on_step is not None:
            on_step(b, to_mask(scores.detach()))
    return to_mask(scores.detach())


def _initial_scores(store, init) -> torch.Tensor:
    if isinstance(init, str):
        if init == "mean":
            return store.pattern_mean()
        if init == "zeros":
            return torch.zeros(store.d)
        raise SupsupError(f"init must be 'mean', 'zeros' or a tensor, got {init!r}")
    s0 = torch.as_tensor(init, dtype=torch.float32)
    if s0.shape != (store.d,):
        raise SupsupError(f"init scores must have shape ({store.d},), got {tuple(s0.shape)}")
    return s0


def recovery_trace(store, objective_fn: Callable[[torch.Tensor], torch.Tensor], target: torch.Tensor,
                   **kwargs) -> dict:
    """:func:`recover` towards a known ``target`` mask, recording the Hamming distance after every step.

    Returns ``{"mask", "hamming" (list, one per step), "final_hamming", "steps_to_converge"}``;
    ``steps_to_converge`` is the first step from which the distance stays 0 (``None`` if it
    never does).
    """
    target = _binary_mask(target, store.d, "target")
    if target.dim() != 1:
        raise SupsupError(f"target must be one mask [d], got shape {tuple(target.shape)}")
    hamming: list[int] = []
    mask = recover(store, objective_fn, on_step=lambda b, m: hamming.append(int((m != target).sum())), **kwargs)
    converged = None
    for i in range(len(hamming) - 1, -1, -1):
        if hamming[i] != 0:
            break
        converged = i + 1
    return {"mask": mask, "hamming": hamming, "final_hamming": hamming[-1], "steps_to_converge": converged}


class HiddenMaskedMLP(nn.Module):
    """A frozen signed-constant MLP whose hidden activations are gated by a per-unit mask.

    ``sizes = (in, h1, ..., hL, out)``; hidden layer ``l`` computes ``act(norm(x W_l^T)) * m_l``
    (``gate="after_activation"``) or ``act(norm(x W_l^T) * m_l)`` (``"before_activation"``: the
    paper's BNNet, whose batch norm takes the mask as its scale), the output ``x W^T``, with
    ``m = concat(m_1..m_L)`` of length ``d = h1 + ... + hL``. For a 0/1 mask the two gates give
    the same outputs (``act(0) = 0`` for ReLU and Swish); their straight-through gradients
    differ: ``act(n)`` after the activation, ``act'(n m) n`` before it (0 for an off ReLU unit,
    ``n / 2`` for an off Swish unit). ``norm="batch"`` is a batch normalisation without affine
    parameters or running statistics (batch statistics in train and eval, so nothing is shared
    across tasks), ``"none"`` skips it. ``activation``: ``"relu"`` or ``"swish"`` (``x
    sigmoid(x)``, the paper's BNNet). Weights are regenerated from ``seed`` with
    :func:`supsup_fast.base_weights.signed_constant` in seed format 1 (the base of the recorded
    HopSupSup results; this network masks units, not weights, so format 2's kernel never runs it)
    and never trained.
    """

    def __init__(self, sizes: Sequence[int], seed: int = 0, norm: str = "batch", activation: str = "relu",
                 gate: str = "after_activation"):
        super().__init__()
        sizes = [int(s) for s in sizes]
        if len(sizes) < 3 or min(sizes) < 1:
            raise SupsupError(f"sizes must be (in, hidden..., out) with >= 1 hidden layer, got {sizes}")
        if norm not in ("batch", "none"):
            raise SupsupError(f"norm must be 'batch' or 'none', got {norm!r}")
        if activation not in ACTIVATIONS:
            raise SupsupError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if gate not in GATES:
            raise SupsupError(f"gate must be one of {GATES}, got {gate!r}")
        self.sizes, self.norm, self.seed = tuple(sizes), norm, int(seed)
        self.activation, self.gate = activation, gate
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            self.register_buffer(f"weight{i}", signed_constant(seed, i, (fan_out, fan_in), format_version=1))
        self.hidden = tuple(sizes[1:-1])
        self.d = sum(self.hidden)

    def forward(self, x: torch.Tensor, unit_mask: torch.Tensor) -> torch.Tensor:
        if unit_mask.shape[-1:] != (self.d,):
            raise SupsupError(f"unit_mask must have last dimension d={self.d}, got {tuple(unit_mask.shape)}")
        x = x.reshape(x.shape[0], -1)
        if x.shape[1] != self.sizes[0]:
            raise SupsupError(f"input has {x.shape[1]} features, the model takes {self.sizes[0]}")
        act = F.relu if self.activation == "relu" else F.silu
        chunks = torch.split(unit_mask.to(x.dtype), self.hidden, dim=-1)
        for i, m in enumerate(chunks):
            x = F.linear(x, getattr(self, f"weight{i}"))
            if self.norm == "batch":
                x = F.batch_norm(x, None, None, training=True)
            x = act(x * m) if self.gate == "before_activation" else act(x) * m
        return F.linear(x, getattr(self, f"weight{len(self.hidden)}"))

    def extra_repr(self) -> str:
        return f"sizes={self.sizes}, norm={self.norm!r}, activation={self.activation!r}, gate={self.gate!r}"


def train_unit_mask(model: HiddenMaskedMLP, batches: Iterable, steps: int, lr: float = 0.1,
                    num_classes: int | None = None, seed: int = 0, optimizer: str = "adam",
                    momentum: float = 0.9, weight_decay: float = 0.0, init: str = "uniform") -> torch.Tensor:
    """Learn one task's unit mask: scores with a straight-through threshold, cross-entropy.

    ``batches`` yields ``(x, y)``; training stops after ``steps`` batches. ``num_classes``
    restricts the loss to the first output neurons (the rest act as superfluous ones).
    ``optimizer``: ``"adam"`` or ``"sgd"`` (with ``momentum``; the paper: SGD lr 0.1, momentum
    0.9, weight decay 1e-4, scores from zeros, one epoch). ``init``: ``"uniform"`` -- scores
    ``U(-0.01, 0.01)`` from ``seed`` (about half the units on) -- or ``"zeros"`` (every unit on
    at the start, the paper). Returns the bool mask ``[model.d]``.
    """
    if not isinstance(steps, int) or steps < 1:
        raise SupsupError(f"steps must be an int >= 1, got {steps!r}")
    if optimizer not in ("adam", "sgd"):
        raise SupsupError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    if init not in ("uniform", "zeros"):
        raise SupsupError(f"init must be 'uniform' or 'zeros', got {init!r}")
    dev = model.weight0.device
    if init == "zeros":
        scores = torch.zeros(model.d, device=dev, requires_grad=True)
    else:
        gen = torch.Generator().manual_seed(seed)
        scores = ((torch.rand(model.d, generator=gen) * 2 - 1) * 0.01).to(dev).requires_grad_(True)
    opt = (torch.optim.Adam([scores], lr=lr, weight_decay=weight_decay) if optimizer == "adam" else
           torch.optim.SGD([scores], lr=lr, momentum=momentum, weight_decay=weight_decay))
    it = iter(batches)
    for _ in range(steps):
        try:
            x, y = next(it)
        except StopIteration:
            it = iter(batches)
            x, y = next(it)
        logits = model(x.to(dev), _SignSTE.apply(scores))
        if num_classes is not None:
            logits = logits[:, :num_classes]
        loss = F.cross_entropy(logits, y.to(dev))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return to_mask(scores.detach())


@torch.no_grad()
def mask_accuracy(model: HiddenMaskedMLP, mask: torch.Tensor, batches: Iterable,
                  num_classes: int | None = None) -> float:
    """Top-1 accuracy of ``model`` gated by ``mask`` over ``batches`` of ``(x, y)``."""
    correct = total = 0
    dev = model.weight0.device
    m = mask.to(dev, torch.float32)
    for x, y in batches:
        logits = model(x.to(dev), m)
        if num_classes is not None:
            logits = logits[:, :num_classes]
        correct += int((logits.argmax(-1) == y.to(dev)).sum())
        total += int(y.numel())
    if total == 0:
        raise SupsupError("mask_accuracy got no examples")
    return correct / total


def recovery_report(exact: Sequence[torch.Tensor], recovered: Sequence[torch.Tensor],
                    accuracy_fn: Callable[[int, torch.Tensor], float] | None = None) -> dict:
    """Compare recovered masks with the exact bank, task by task.

    Returns ``{"tasks": [{"task", "hamming", "hamming_fraction", "exact_acc"?, "recovered_acc"?}],
    "mean_hamming", "exact_recoveries"[, "mean_exact_acc", "mean_recovered_acc"]}``;
    accuracies come from ``accuracy_fn(task, mask)`` when given.
    """
    if len(exact) != len(recovered):
        raise SupsupError(f"{len(exact)} exact masks but {len(recovered)} recovered ones")
    rows = []
    for t, (e, r) in enumerate(zip(exact, recovered)):
        e, r = e != 0, r.to(e.device) != 0
        if e.shape != r.shape:
            raise SupsupError(f"task {t}: exact mask {tuple(e.shape)} vs recovered {tuple(r.shape)}")
        ham = int((e != r).sum())
        row = {"task": t, "hamming": ham, "hamming_fraction": ham / max(e.numel(), 1)}
        if accuracy_fn is not None:
            row["exact_acc"] = float(accuracy_fn(t, e))
            row["recovered_acc"] = float(accuracy_fn(t, r))
        rows.append(row)
    out = {"tasks": rows, "mean_hamming": sum(r["hamming"] for r in rows) / max(len(rows), 1),
           "exact_recoveries": sum(r["hamming"] == 0 for r in rows)}
    if accuracy_fn is not None and rows:
        out["mean_exact_acc"] = sum(r["exact_acc"] for r in rows) / len(rows)
        out["mean_recovered_acc"] = sum(r["recovered_acc"] for r in rows) / len(rows)
    return out
