"""NNs: continual learning with no task identity at all, not even at training time.

One mask is trained at a time. Every ``check_every`` batches the trainer runs one-shot task
inference on the incoming batch over ``S = max(k, min_slots)`` slots (``k`` allocated masks), with
``alpha`` uniform ``1/S``, and forms the belief ``nu = softmax(-(d H / d alpha) / temperature)``
(``temperature = 1`` in the paper):

* if ``S * max(nu) < 1 + epsilon`` (:func:`is_novel`: the belief is close to uniform, no mask
  explains the data) a new mask is allocated -- the open one is frozen and a fresh task begun;
* otherwise the argmax slot's mask is trained from this batch on.

Slots, in order (decisions of this implementation, documented because the paper leaves them open):

* ``0 .. F-1`` -- the ``F`` frozen masks, from the bank (packed ops throughout);
* the mask in training is a slot too, with its *current* binarised mask: slot ``F`` when it is
  a new task, or its own slot when it is a reopened frozen task (whose bank row is then
  replaced by the live mask);
* the remaining ``S - k`` slots are untrained masks, as in the paper: the masks a fresh task's
  initial scores would give (Kaiming-uniform scores through the layer's binariser), drawn once
  from ``seed`` and reused at every check. If one of them wins the argmax, the data fits no
  trained mask better than chance, so a new mask is allocated (it starts from ordinary fresh
  scores, not from that slot's).

Switching to another mask: the trainer keeps float scores for the open mask only. To continue
training frozen mask ``j`` it freezes the open mask (its bits go to the bank) and reopens ``j``
with ``begin_task(j)``, whose scores are drawn so the binariser reproduces ``j``'s stored mask
exactly; training then continues from that mask (its former score magnitudes are not kept -- no
float state per task exists). The optimizer is rebuilt on every switch.

The belief test alone does not scale with the number of masks: with ``S`` slots of gradients that
carry no information (data no mask fits), ``S * max(nu)`` grows with ``S``, while for data one
mask fits it shrinks (that mask's advantage is shared among more slots). On PermutedMNIST-5k
with LeNet-300-100 the two met at 24 masks: ``S * max(nu)`` was 1.03-1.11 at the first batch of
each of tasks 1-23 (novel) and at least 1.40 within them, but 1.14 at the first batch of task 24,
so task 24 and every later one were trained into mask 12 (a 100-task run; its results were not kept).
Hence a second test (``own_entropy``, on by default): when the belief test picks a trained mask,
that mask's *own* network (``alpha = e_j``) is run on the check batch, and if its mean output
entropy exceeds ``own_entropy * log(outputs)`` the data is novel after all. A mask on its own
task's data is confident; on data it was not trained for it is not (on PermutedMNIST-5k, 0.18-0.30
nats for the right mask against at least 3.39 for the best wrong one, of ``log 100 = 4.61``; a fresh
mask is at 0.89 after 100 RMSprop steps at lr 1e-4). ``own_entropy=None`` is the paper's test alone.
A mask trained for fewer than ``check_every`` batches is not judged this way (it is still learning).

The novelty test uses ``S`` (the number of slots) as its ``k``. For ``k >= min_slots`` this is
the paper's ``k * max(nu) < 1 + epsilon``; for fewer masks the paper's literal ``k`` (allocated
masks) with ``nu`` over ``min_slots`` slots makes the first check always allocate (``1 * max(nu)
<= 1``), whatever the data. ``k_mode="allocated"`` restores that literal rule.

During a check, normalisation layers run as in training (batch statistics); the open task's
running statistics are restored afterwards, so checks leave no trace in them.

A budget of ``budget`` masks (2500 in the paper) bounds the allocations: exceeding it raises
:class:`~supsup_fast.errors.SupsupError`.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import convert, ops
from .binarise import binarise
from .errors import SupsupError
from .nn import TaskBatchNorm
from .nn._model import masked_modules, model_device, preserved_mode, task_modules
from .objectives import entropy_rows, objective_rows
from .training import OptimizerFactory, check_finite_loss, make_optimizer


def is_novel(grad_alpha: torch.Tensor, k: int, epsilon: float = 2.0 ** -3) -> bool:
    """The NNs novelty test: ``k * max(softmax(-grad_alpha)) < 1 + epsilon``.

    ``grad_alpha`` is ``d obj / d alpha`` over the slots (1-D); ``k`` the count the belief is
    compared against (uniform belief over ``k`` slots gives ``k * max = 1``).
    """
    if not isinstance(grad_alpha, torch.Tensor) or grad_alpha.dim() != 1 or grad_alpha.numel() == 0:
        raise SupsupError("grad_alpha must be a non-empty 1-D tensor of slot gradients")
    if not bool(torch.isfinite(grad_alpha).all()):  # a NaN belief would read as "not novel", task 0
        raise SupsupError("grad_alpha must be finite: the batch holds NaN/Inf or the network overflowed; "
                          "the novelty test cannot decide on it")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise SupsupError(f"k must be a positive int, got {k!r}")
    if not epsilon >= 0:
        raise SupsupError(f"epsilon must be >= 0, got {epsilon}")
    nu = torch.softmax(-grad_alpha.double(), dim=0)
    return bool(k * float(nu.max()) < 1.0 + float(epsilon))


class NNsTrainer:
    """Train masks from an unlabelled-by-task stream of batches, allocating masks as data changes.

    Args:
        model: a converted model (:func:`~supsup_fast.convert.convert_`). Frozen tasks it already
            holds count as allocated masks; an open task is adopted as the mask in training.
        optimizer: ``"rmsprop"`` (the paper's), ``"adam"``, ``"sgd"`` or ``params -> Optimizer``.
        lr: learning rate (``None``: the optimizer's default in :data:`supsup_fast.training.DEFAULT_LR`).
        check_every: batches between novelty checks (the first check is at batch ``check_every``).
        epsilon: the novelty margin ``epsilon`` (``2**-3`` in the paper).
        min_slots: at least this many slots take part in a check (5 in the paper).
        budget: the most masks that may be allocated.
        objective / num_real: the inference objective (``"entropy"``, or ``"g"`` with ``num_real``).
        rows: leading rows of the batch used by a check (``None`` = all).
        k_mode: ``"slots"`` (default) or ``"allocated"``, the ``k`` of the novelty test (module docstring).
        own_entropy: the second novelty test's threshold, a fraction of ``log(outputs)`` (module
            docstring); ``None`` keeps the paper's belief test alone.
        temperature: ``nu = softmax(-grad / temperature)``. The paper's ``1`` suits its MNIST nets;
            the gradients' scale depends on the network, so small nets may need a sharper belief.
        seed: seed of the untrained slots' masks.

    Use :meth:`step` per batch and :meth:`finish` at the end; :attr:`history` records every check.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Union[str, OptimizerFactory] = "rmsprop",
        *,
        lr: Optional[float] = None,
        weight_decay: float = 0.0,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
        check_every: int = 100,
        epsilon: float = 2.0 ** -3,
        min_slots: int = 5,
        budget: int = 2500,
        objective: str = "entropy",
        num_real: Optional[int] = None,
        rows: Optional[int] = None,
        k_mode: str = "slots",
        temperature: float = 1.0,
        seed: int = 0,
        own_entropy: Optional[float] = 0.5,
    ) -> None:
        for name, v in (("check_every", check_every), ("min_slots", min_slots), ("budget", budget)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise SupsupError(f"NNsTrainer: {name} must be a positive int, got {v!r}")
        if k_mode not in ("slots", "allocated"):
            raise SupsupError(f"NNsTrainer: k_mode must be 'slots' or 'allocated', got {k_mode!r}")
        if not epsilon >= 0:
            raise SupsupError(f"NNsTrainer: epsilon must be >= 0, got {epsilon}")
        if not temperature > 0:
            raise SupsupError(f"NNsTrainer: temperature must be positive, got {temperature}")
        if own_entropy is not None and not 0.0 < own_entropy <= 1.0:
            raise SupsupError(f"NNsTrainer: own_entropy is a fraction of log(outputs) in (0, 1] or None, got {own_entropy}")
        if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 1):
            raise SupsupError(f"NNsTrainer: rows must be a positive int or None, got {rows!r}")
        self.model = model
        self.layers = masked_modules(model)
        if not self.layers:
            raise SupsupError("NNsTrainer: the model has no masked layers; convert it with convert_ first")
        self.device = model_device(model)
        self._optimizer_spec = (optimizer, lr, weight_decay)
        self.loss_fn = loss_fn
        self.check_every = check_every
        self.epsilon = float(epsilon)
        self.min_slots = min_slots
        self.budget = budget
        self.objective = objective_rows(objective, num_real)
        self.rows = rows
        self.k_mode = k_mode
        self.temperature = float(temperature)
        self.seed = int(seed)
        self.own_entropy = None if own_entropy is None else float(own_entropy)
        self._opened_at = 0  # batches_seen when the mask in training was (re)opened
        self.batches_seen = 0
        self.history: list[dict] = []
        self._padding: dict[int, list[torch.Tensor]] = {}  # slot -> per-layer packed untrained masks
        self.optimizer: Optional[torch.optim.Optimizer] = None
        if any(m.in_training for m in self.layers):
            self.current = self.layers[0].open_task
            self._new_optimizer()
        else:
            self.current = None

    # ---- bookkeeping -----------------------------------------------------------------------
    @property
    def num_frozen(self) -> int:
        return convert.num_tasks(self.model)

    @property
    def num_masks(self) -> int:
        """Masks allocated so far (frozen ones plus a new one in training)."""
        f = self.num_frozen
        return f + (1 if self.current is not None and self.current >= f else 0)

    def _new_optimizer(self) -> None:
        opt, lr, wd = self._optimizer_spec
        self.optimizer = make_optimizer(convert.task_parameters(self.model), opt, lr, wd)

    def _allocate(self) -> int:
        if self.num_masks >= self.budget:
            raise SupsupError(f"NNs budget exhausted: {self.budget} masks are allocated and the data asks for a "
                              "new one")
        if self.current is not None:
            convert.freeze_task(self.model)
        self.current = convert.begin_task(self.model)
        self._opened_at = self.batches_seen
        self._new_optimizer()
        return self.current

    def _switch(self, task: int) -> None:
        convert.freeze_task(self.model)
        self.current = convert.begin_task(self.model, task)
        self._opened_at = self.batches_seen
        self._new_optimizer()

    # ---- the novelty check ---------------------------------------------------------------------
    def _padding_words(self, slot: int) -> list[torch.Tensor]:
        """Packed untrained masks of one padding slot, one per layer (drawn once per slot)."""
        got = self._padding.get(slot)
        if got is None:
            gen = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + slot)
            got = []
            for layer in self.layers:
                n, k = layer.gemm_shape
                bound = 1.0 / math.sqrt(k)
                scores = (torch.rand(layer.weight.shape, generator=gen, dtype=torch.float32) * 2 - 1) * bound
                mask = binarise(scores, layer.binariser, layer.density)
                got.append(ops.pack_masks(mask.reshape(n, k)).to(layer.weight.device))
            self._padding[slot] = got
        return got

    def slot_gradients(self, x: torch.Tensor) -> torch.Tensor:
        """``d obj / d alpha`` over the ``S = max(k, min_slots)`` slots at ``alpha = 1/S`` (slot order above)."""
        if self.current is None:
            raise SupsupError("NNsTrainer: no mask is allocated yet")
        f = self.num_frozen
        reopened = self.current < f
        k = self.num_masks
        s = max(k, self.min_slots)
        pad_slots = list(range(k, s))
        live_slot = self.current
        extra_slots = [live_slot] + pad_slots
        a_bank = torch.full((f,), 1.0 / s, device=self.device)
        if reopened:
            a_bank[self.current] = 0.0  # its live mask stands in for the stored one
        a_bank.requires_grad_(True)
        a_extra = torch.full((len(extra_slots),), 1.0 / s, device=self.device, requires_grad=True)
        extra_banks = []
        for i, layer in enumerate(self.layers):
            n, kk = layer.gemm_shape
            live = ops.pack_masks(layer.current_mask().reshape(n, kk))
            extra_banks.append(torch.stack([live] + [self._padding_words(p)[i] for p in pad_slots]))

        def make_hook(i):
            def hook(layer, inputs, output):
                w_eff = ops.superpose(layer.weight, extra_banks[i], a_extra)
                if f:
                    w_eff = w_eff + ops.superpose(layer.weight, layer.bank, a_bank)
                return layer._forward_dense(inputs[0], w_eff)
            return hook

        xs = x if self.rows is None else x[: self.rows]
        # normalisation runs as in training (batch statistics) but a check must not update the
        # open task's running statistics
        norms = [m for m in task_modules(self.model) if isinstance(m, TaskBatchNorm) and m.in_training]
        saved = [(m.task_mean.clone(), m.task_var.clone()) for m in norms]
        handles = [layer.register_forward_hook(make_hook(i)) for i, layer in enumerate(self.layers)]
        try:
            with torch.enable_grad():
                logits = self.model(xs)
                obj = self.objective(logits).mean()
                g_bank, g_extra = torch.autograd.grad(obj, [a_bank, a_extra], allow_unused=True)
        finally:
            for h in handles:
                h.remove()
            with torch.no_grad():
                for m, (mean, var) in zip(norms, saved):
                    m.task_mean.copy_(mean)
                    m.task_var.copy_(var)
        g = torch.zeros(s, device=self.device)
        if f and g_bank is not None:
            g[:f] = g_bank.detach()
        if g_extra is not None:
            g[torch.tensor(extra_slots, device=self.device)] = g_extra.detach()
        return g

    def check(self, x: torch.Tensor) -> dict:
        """Run the novelty check on ``x`` and act on it; returns the record added to :attr:`history`."""
        k = self.num_masks
        g = self.slot_gradients(x.to(self.device)) / self.temperature
        s = g.shape[0]
        nu = torch.softmax(-g.double(), 0)
        novel = is_novel(g, s if self.k_mode == "slots" else k, self.epsilon)
        best = int(nu.argmax())
        record = {"batch": self.batches_seen, "masks": k, "slots": s, "nu_max": float(nu.max()), "argmax": best,
                  "from": self.current, "grads": g.tolist()}
        record["novel_by"] = "belief" if novel or best >= k else None
        judged = best != self.current or self.batches_seen - self._opened_at >= self.check_every
        if record["novel_by"] is None and self.own_entropy is not None and judged:
            h, limit = self.own_network_entropy(x.to(self.device), best)
            record["own_entropy"], record["own_entropy_limit"] = h, limit
            if h > limit:
                record["novel_by"] = "own_entropy"
        if record["novel_by"] is not None:
            record["decision"] = "new"
            self._allocate()
        elif best != self.current:
            record["decision"] = "switch"
            self._switch(best)
        else:
            record["decision"] = "continue"
        record["to"] = self.current
        self.history.append(record)
        return record

    @torch.no_grad()
    def own_network_entropy(self, x: torch.Tensor, slot: int) -> tuple[float, float]:
        """Mean output entropy of mask ``slot``'s own network on ``x`` (eval mode; the mask in
        training with its current bits), and the novelty limit ``own_entropy * log(outputs)``."""
        xs = x if self.rows is None else x[: self.rows]
        was_training = self.model.training
        self.model.eval()
        try:
            with preserved_mode(self.model):
                convert.set_task(self.model, slot)
                logits = self.model(xs)
        finally:
            self.model.train(was_training)
        h = float(entropy_rows(logits).mean())
        return h, self.own_entropy * math.log(logits.shape[-1])

    # ---- the stream ---------------------------------------------------------------------------
    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One batch: the novelty check when due, then a training step of the chosen mask; returns the loss.

        A batch holding NaN / inf (or a non-finite loss) is refused with :class:`SupsupError` before the
        check and the update: it would otherwise decide a novelty test and poison the mask's scores."""
        x, y = x.to(self.device), y.to(self.device)
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise SupsupError(f"NNsTrainer.step (batch {self.batches_seen}): x holds NaN or inf; nothing was updated")
        if self.current is None:
            self._allocate()
        elif self.batches_seen > 0 and self.batches_seen % self.check_every == 0:
            self.check(x)
        self.model.train()
        logits = self.model(x)
        loss = self.loss_fn(logits, y)
        check_finite_loss(loss, f"NNsTrainer.step (batch {self.batches_seen})")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.batches_seen += 1
        return float(loss.detach())

    def finish(self) -> int:
        """Freeze the mask in training; returns the number of masks stored."""
        if self.current is not None and any(m.in_training for m in self.layers):
            convert.freeze_task(self.model)
        self.current = None
        self.optimizer = None
        return self.num_frozen
