"""Drop-in masked layers: a frozen base weight, a bank of 1-bit task masks, and scores for one task.

A :class:`MaskedLinear` / :class:`MaskedConv2d` holds

* ``weight`` -- the frozen base weight (a buffer). With ``base="signed_constant"`` it is
  regenerated from ``(config.seed, layer_id)`` on construction and is not saved (a
  ``base_id = [seed, layer_id]`` buffer is saved instead and checked on load); with
  ``base="pretrained"`` it is the wrapped layer's weight and is saved.
* ``bank`` -- int32 ``[T, N, ceil(K/32)]``: the packed masks of the ``T`` frozen tasks
  (:mod:`supsup_fast.format`). Exactly ``T * N * ceil(K/32) * 4`` bytes are saved; in memory
  the bank grows geometrically so freezing task ``T`` costs ``O(N K / 32)``, not ``O(T N K / 32)``.
* ``scores`` -- an ``nn.Parameter`` of the weight's shape, allocated only while a task is in
  training (``begin_task`` ... ``freeze_task``); ``None`` otherwise. No float tensor per task is
  ever kept.

``forward`` by mode (see :mod:`supsup_fast.nn.base`):

* ``"train"``: ``M = binarise(scores)`` (straight-through, :mod:`supsup_fast.binarize`), packed
  as it is selected, and applied by the packed-mask op, which routes ``dL/dM = (dL/dy^T x) * W`` into
  ``S`` times the binariser's straight-through derivative (see :mod:`supsup_fast.binarize`);
* ``"task"``: ``ops.masked_linear`` / ``ops.masked_conv2d`` with ``bank[task_id]``;
* ``"superpose"``: ``W_eff = ops.superpose(weight, bank, alpha)``, then ``F.linear`` / ``F.conv2d``,
  so ``d loss / d alpha`` flows through ``superpose``'s autograd (``mask_dots``);
* ``"rows"``: row ``i`` through task ``row_tasks[i]``'s mask: ``ops.masked_linear_grouped`` (one
  call for the whole batch) for a linear layer, one ``masked_conv2d`` per task present for a conv.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..base_weights import signed_constant as _signed_constant
from ..binarise import binarise, binarise_words, kept_count, straight_through_sign
from ..config import SupsupConfig, check_seed
from ..errors import SupsupError
from ..format import gemm_shape, words_per_row
from ..ops._registry import eager_entry
from .base import TaskModule, _as_task_id


class MaskedLayerBase(TaskModule):
    """State and task protocol shared by :class:`MaskedLinear` and :class:`MaskedConv2d`.

    Attributes:
        density: fraction kept by the top-k binariser for this layer (set per layer by
            :func:`~supsup_fast.convert.convert_` under an Erdős–Rényi schedule).
        binariser: ``"topk"`` or ``"threshold"``.
        layer_id: the key of this layer's signed-constant base weight.
    """

    def __init__(
        self,
        weight_shape: Sequence[int],
        config: Optional[SupsupConfig],
        layer_id: int,
        weight: Optional[torch.Tensor],
        bias: Optional[torch.Tensor],
        dtype: Optional[torch.dtype] = None,
        device=None,
    ) -> None:
        config = SupsupConfig() if config is None else config
        if not isinstance(config, SupsupConfig):
            raise SupsupError(f"config must be a SupsupConfig, got {type(config).__name__}")
        super().__init__(config.max_tasks, device)
        shape = tuple(int(s) for s in weight_shape)
        if min(shape) <= 0:
            raise SupsupError(f"{type(self).__name__}: every weight dimension must be positive, got shape {shape}")
        self.config = config
        self.layer_id = check_seed(layer_id, f"{type(self).__name__}: layer_id")  # one base, one name
        self.binariser = config.binariser
        self.density = config.density
        self.score_init = config.score_init
        n, k = gemm_shape(shape)

        self._weight_shape = shape
        self.seed_format = 1  # of a signed-constant base; a pretrained one has none
        self._lazy_weight = False
        if weight is None:
            if config.base == "pretrained":
                raise SupsupError(f"{type(self).__name__}: base='pretrained' needs the wrapped layer's weight")
            dtype = torch.float32 if dtype is None else dtype
            if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
                raise SupsupError(f"{type(self).__name__}: dtype must be fp16/bf16/fp32/fp64, got {dtype}")
            self.seed_format = config.seed_format
            self._base_seed, self._gain = config.seed, config.gain
            # +-scale: the base's one value, as the seeded kernels take it; the buffer keeps the
            # weight's dtype and device through .to() while the weight itself may be absent
            self._scale = config.gain / math.sqrt(k)
            scale = torch.tensor(self._scale, dtype=torch.float32).to(device=device, dtype=dtype)
            self.register_buffer("base_scale", scale, persistent=False)
            # a layer the ternary kernel can serve is regenerated on first use, not on construction
            self._lazy_weight = self._ternary_capable()
            w = None if self._lazy_weight else self._regenerate_weight()
            self.register_buffer("weight", w, persistent=False)
            # format 1 keeps the id every bank saved before format 2 holds
            base_id = [config.seed, self.layer_id] + ([self.seed_format] if self.seed_format != 1 else [])
            self.register_buffer("base_id", torch.tensor(base_id, dtype=torch.int64, device=device))
        else:
            if tuple(weight.shape) != shape:
                raise SupsupError(f"{type(self).__name__}: weight has shape {tuple(weight.shape)}, expected {shape}")
            if not weight.is_floating_point():
                raise SupsupError(f"{type(self).__name__}: weight must be floating, got {weight.dtype}")
            # an explicit weight is a pretrained base whatever config.base says: it is saved
            self.register_buffer("weight", weight.detach().clone(), persistent=True)
        ref = self.weight if self._buffers["weight"] is not None else self.base_scale
        if bias is not None:
            if tuple(bias.shape) != (n,):
                raise SupsupError(f"{type(self).__name__}: bias has shape {tuple(bias.shape)}, expected ({n},)")
            bias = bias.detach().clone().to(ref.dtype)
        self.register_buffer("bias", bias)
        self.register_buffer("bank", torch.zeros((0, n, words_per_row(k)), dtype=torch.int32, device=ref.device))
        self._bank_store: Optional[torch.Tensor] = None  # geometric-growth storage behind `bank`
        self.register_parameter("scores", None)
        # running mean of frozen tasks' scores ("transfer" init); allocated at the first freeze
        self.register_buffer("score_mean", None)
        self._score_mean_count = 0

    # ---- the base weight: regenerated on first use where the ternary kernel serves ---------
    def _ternary_capable(self) -> bool:
        """Whether this layer's task forward can run the ternary kernel (:meth:`_ternary_serves`)."""
        return False

    def _regenerate_weight(self) -> torch.Tensor:
        s = self.base_scale
        return _signed_constant(self._base_seed, self.layer_id, self._weight_shape, self._gain, s.dtype, s.device,
                                format_version=self.seed_format)

    def __getattr__(self, name: str):
        # `weight` of a lazy signed-constant base: regenerated (and kept) when something reads it;
        # the ternary forward never does, and drops it (_release_weight)
        if name == "weight":
            d = self.__dict__
            buffers = d.get("_buffers")
            if d.get("_lazy_weight") and buffers is not None and buffers.get("weight") is None:
                w = buffers["weight"] = self._regenerate_weight()
                return w
        return super().__getattr__(name)

    # The forward reads its tensors from ``_buffers`` directly: every ``self.<buffer>`` goes through
    # nn.Module.__getattr__ (and the override above), about 1 us a name, several names a layer call.
    def _weight_now(self) -> torch.Tensor:
        """``self.weight`` (regenerated first where it is a lazy base that is not resident)."""
        w = self._buffers.get("weight")
        return w if w is not None else self.weight

    def _bias_now(self) -> Optional[torch.Tensor]:
        return self._buffers["bias"] if "bias" in self._buffers else self.bias

    def _release_weight(self) -> None:
        if self._buffers.get("weight") is not None:
            self._buffers["weight"] = None

    @property
    def weight_resident(self) -> bool:
        """Whether the dense base weight is in memory now (a lazy base regenerates it on demand)."""
        return self._buffers.get("weight") is not None

    # ---- sizes -------------------------------------------------------------------------
    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The base weight's shape (read without regenerating a lazy weight)."""
        return tuple(self._weight_shape)

    @property
    def gemm_shape(self) -> tuple[int, int]:
        """``(N, K)``: the GEMM view of the weight the masks cover."""
        return gemm_shape(self._weight_shape)

    @property
    def num_tasks(self) -> int:
        return int(self.bank.shape[0])

    @property
    def in_training(self) -> bool:
        return self.scores is not None

    def mask_nbytes(self) -> int:
        """Bytes of stored mask bits: ``num_tasks * N * ceil(K/32) * 4``."""
        return self.bank.numel() * self.bank.element_size()

    def _reference_tensor(self) -> torch.Tensor:
        return self.bank  # on the layer's device, without regenerating a lazy weight

    # ---- task protocol -----------------------------------------------------------------
    def begin_task(self, task: Optional[int] = None) -> int:
        """Allocate scores for a new task (id ``num_tasks``), or reopen frozen task ``task``.

        A reopened task's scores are drawn so the binariser reproduces its stored mask exactly;
        :meth:`freeze_task` then overwrites it in place. Returns the task id; mode becomes ``"train"``.
        """
        t = self._task_to_open(task)
        w = self.weight
        bound = 1.0 / math.sqrt(self.gemm_shape[1])
        if t < self.num_tasks:
            scores = self._scores_reproducing(self.task_mask(t), bound)
        elif self.score_init == "transfer" and self.score_mean is not None:
            scores = self.score_mean.to(w.dtype).clone()
        else:
            scores = torch.empty_like(w).uniform_(-bound, bound)
        self.scores = nn.Parameter(scores)
        self.mode, self.task_id, self.open_task = "train", t, t
        return t

    def _scores_reproducing(self, mask: torch.Tensor, bound: float) -> torch.Tensor:
        u = torch.rand(mask.shape, dtype=self.weight.dtype, device=self.weight.device) * bound
        if self.binariser == "threshold":
            return torch.where(mask, u, u - bound)  # kept >= 0 > dropped
        if int(mask.sum()) != kept_count(mask.numel(), self.density):
            raise SupsupError(
                f"{type(self).__name__}: cannot reopen the task: its mask keeps {int(mask.sum())} weights but top-k "
                f"at density {self.density} keeps {kept_count(mask.numel(), self.density)}"
            )
        sign = torch.where(torch.rand_like(u) < 0.5, -1.0, 1.0).to(u.dtype)
        return sign * torch.where(mask, bound + u, 0.5 * (bound - u))  # kept |S| >= bound > dropped |S|

    @torch.no_grad()
    def current_mask(self) -> torch.Tensor:
        """The binarised mask of the task in training (float 0/1, weight shape, no gradient)."""
        if self.scores is None:
            raise SupsupError(f"{type(self).__name__}: no task is in training; call begin_task() first")
        return binarise(self.scores.detach(), self.binariser, self.density)

    @torch.no_grad()
    def freeze_task(self) -> int:
        """Pack the task in training into the bank, drop its scores; returns its id; mode becomes ``"task"``.

        A new task is appended (and, with ``score_init="transfer"``, folded into the running mean of
        scores); a reopened task overwrites its bits in place and leaves the running mean alone.
        """
        self._check_freeze()
        t = self.open_task
        n = self.gemm_shape[0]
        words = ops.pack_masks(self.current_mask().reshape(n, -1))
        if t < self.num_tasks:
            self.bank[t] = words
        else:
            self._append(words)
            if self.score_init == "transfer":
                s = self.scores.detach().float()
                if self.score_mean is None:
                    self.score_mean = s.clone()
                else:
                    self.score_mean += (s - self.score_mean) / (self._score_mean_count + 1)
                self._score_mean_count += 1
        self.scores = None
        self.mode, self.task_id, self.open_task = "task", t, None
        return t

    def _append(self, words: torch.Tensor) -> None:
        t, bank, store = self.num_tasks, self.bank, self._bank_store
        stale = (
            store is None
            or store.device != bank.device
            or t >= store.shape[0]
            or (t > 0 and bank.data_ptr() != store.data_ptr())  # bank was replaced (.to(), load)
        )
        if stale:
            cap = max(4, 2 * (t + 1))
            if self.max_tasks is not None:
                cap = max(t + 1, min(cap, self.max_tasks))
            store = torch.empty((cap,) + tuple(bank.shape[1:]), dtype=bank.dtype, device=bank.device)
            store[:t] = bank
            self._bank_store = store
        store[t] = words
        self.bank = store[: t + 1]

    @torch.no_grad()
    def delete_task(self, t: int) -> None:
        """Remove frozen task ``t`` from the bank (later tasks move down one id). The transfer score mean, when kept,
        still includes the deleted task: scores are not stored, so it cannot be taken out."""
        self.bank = torch.cat([self.bank[:t], self.bank[t + 1:]])
        self._bank_store = None

    def discard_task(self) -> None:
        """Drop the open task's scores without storing them; a reopened task keeps its stored mask."""
        self._check_freeze()
        self.scores = None
        self._after_discard()

    @torch.no_grad()
    def masked_weight(self, t: int) -> torch.Tensor:
        """``W * M_t``: the dense weight frozen task ``t`` applies (what :func:`~supsup_fast.merge_task` folds in)."""
        return self.weight * self.task_mask(t).to(self.weight.dtype)

    @torch.no_grad()
    def task_mask(self, t: int) -> torch.Tensor:
        """Frozen task ``t``'s mask as a bool tensor of the weight's shape."""
        t = _as_task_id(t)
        if not 0 <= t < self.num_tasks:
            raise SupsupError(f"{type(self).__name__}: task id {t} out of range: num_tasks={self.num_tasks}")
        return ops.unpack(self.bank[t], self._weight_shape)

    # ---- forward -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = self.mode
        buffers = self._buffers
        if mode == "task":
            if torch.compiler.is_compiling():  # one graph for every task id (the task_index buffer)
                return self._forward_words(x, buffers["bank"].index_select(0, buffers["task_index"]).squeeze(0))
            return self._forward_words(x, buffers["bank"][self._task_id])  # eager: a view, ~4 us less a layer
        if mode == "superpose":
            return self._forward_dense(x, ops.superpose(self._weight_now(), buffers["bank"], self.alpha))
        if mode == "rows":
            return self._forward_rows(x, self._rows_of(x))
        scores = self.scores
        if scores is None:
            raise SupsupError(f"{type(self).__name__}: no task selected: call begin_task() or set_task(t)")
        words = binarise_words(scores, self.binariser, self.density)
        return self._forward_train(x, words, scores, straight_through_sign(self.binariser))

    def _forward_words(self, x, words):  # pragma: no cover - abstract
        raise NotImplementedError

    def _forward_rows(self, x, ids):
        """Rows grouped by task, one call per task present (the conv layers' path)."""
        out = None
        for t in torch.unique(ids).tolist():
            rows = torch.nonzero(ids == t).flatten()
            y = self._forward_words(x.index_select(0, rows), self.bank[t])
            if out is None:
                out = y.new_empty((x.shape[0],) + tuple(y.shape[1:]))
            out.index_copy_(0, rows, y)
        return self._forward_words(x, self.bank[0]) if out is None else out  # an empty batch

    def _forward_dense(self, x, weight):  # pragma: no cover - abstract
        raise NotImplementedError

    def _forward_train(self, x, words, scores, score_sign):  # pragma: no cover - abstract
        raise NotImplementedError

    # ---- state dict: the bank (and the open task's scores) follow the saved sizes ---------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        key = prefix + "bank"
        bank = destination.get(key)
        if bank is not None and bank.untyped_storage().nbytes() != bank.numel() * bank.element_size():
            destination[key] = bank.clone()  # save T tasks, not the growth capacity behind them

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        name = type(self).__name__
        key = prefix + "base_id"
        if key in state_dict and getattr(self, "base_id", None) is not None:
            if not torch.equal(state_dict[key].cpu(), self.base_id.cpu()):
                saved = state_dict[key].tolist()
                raise SupsupError(
                    f"{name} at '{prefix}': the state dict was saved over the signed-constant base "
                    f"[seed, layer_id(, seed_format if not 1)]={saved}, this layer regenerates {self.base_id.tolist()}"
                )
        key = prefix + "bank"
        if key in state_dict:
            bank = state_dict[key]
            want = tuple(self.bank.shape[1:])
            if bank.dtype != torch.int32 or bank.dim() != 3 or tuple(bank.shape[1:]) != want:
                raise SupsupError(
                    f"{name} at '{prefix}': saved bank is {bank.dtype} {tuple(bank.shape)}, expected int32 "
                    f"[T, {want[0]}, {want[1]}] for weight {self._weight_shape}"
                )
            if self.max_tasks is not None and bank.shape[0] > self.max_tasks:
                raise SupsupError(f"{name} at '{prefix}': saved bank holds {bank.shape[0]} tasks, "
                                  f"more than max_tasks={self.max_tasks}")
            self.bank = torch.empty(bank.shape, dtype=torch.int32, device=self.bank.device)
            self._bank_store = None
        w = self._buffers["weight"]  # a lazy base stays absent: only its dtype and device are needed
        w = self.base_scale if w is None else w
        key = prefix + "scores"
        if key in state_dict and self.scores is None:
            self.scores = nn.Parameter(torch.empty(self._weight_shape, dtype=w.dtype, device=w.device))
        elif key not in state_dict and self.scores is not None:
            self.scores = None
        key = prefix + "score_mean"
        if key in state_dict and self.score_mean is None:
            self.score_mean = torch.empty(self._weight_shape, dtype=torch.float32, device=w.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        # the transfer mean's count is the number of tasks that fed it
        self._score_mean_count = self.num_tasks if self.score_mean is not None else 0
        self._mode_after_load()

    def extra_repr(self) -> str:
        base = "pretrained" if getattr(self, "base_id", None) is None else (
            f"signed_constant(layer_id={self.layer_id}" + (f", seed_format={self.seed_format})"
                                                          if self.seed_format != 1 else ")"))
        dens = f", density={self.density:.4g}" if self.binariser == "topk" else ""
        return (f"{self._shape_repr()}, tasks={self.num_tasks}, mode={self.mode!r}, task_id={self.task_id}, "
                f"binariser={self.binariser!r}{dens}, base={base}, bias={self.bias is not None}")

    def _shape_repr(self) -> str:  # pragma: no cover - overridden
        return ""


#: The most rows (``x.numel() / in_features``) a format-2 MaskedLinear sends to the ternary kernel in
#: task mode. Measured (bench/ternary_table.py, 1 and 2 threads, 2026-12-01, shared 2-core Zen 4):
#: faster than ``masked_linear`` at every FC-1024 / LeNet / 4096x4096 shape up to M = 64; at
#: M = 128 the 100x100 layer is slower (43 vs 40 us at 1 thread).
TERNARY_MAX_ROWS = 64

@torch.compiler.assume_constant_result  # traced as its value: the registry's lookup cache is not guarded on
def _ternary_kernel_serves() -> bool:
    """Whether the compiled kernel (not the reference, which regenerates the weight per call) runs
    float32 CPU calls of ``ternary_linear``: the registry picks the backend whose eager entry it is,
    so a forced backend is obeyed (and without the extension there is none). Under ``torch.compile``
    the answer is taken when a graph is traced (a graph traced before a backend is forced keeps calling
    ``ternary_linear``, which then runs on the forced backend); tracing the lookup itself would guard
    the graph on the registry's cache, whose first fill made every compiled task-mode model compile twice."""
    return eager_entry("ternary_linear") is not None


class MaskedLinear(MaskedLayerBase):
    """``nn.Linear`` with a supermask per task: ``y = x (W * M_t)^T (+ b)``; ``W`` frozen."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        config: Optional[SupsupConfig] = None,
        layer_id: int = 0,
        weight: Optional[torch.Tensor] = None,
        bias_value: Optional[torch.Tensor] = None,
        dtype: Optional[torch.dtype] = None,
        device=None,
    ) -> None:
        if bias and bias_value is None:
            raise SupsupError("MaskedLinear(bias=True) keeps a frozen bias and needs its value (bias_value=...); "
                              "SupSup layers have no trainable bias")
        self.in_features, self.out_features = int(in_features), int(out_features)
        super().__init__((out_features, in_features), config, layer_id, weight,
                         bias_value if bias else None, dtype, device)

    @classmethod
    def from_module(cls, module: nn.Linear, config: Optional[SupsupConfig] = None, layer_id: int = 0) -> "MaskedLinear":
        """A masked twin of ``module``: same shape, dtype and device; its weight kept only for ``base='pretrained'``."""
        if not isinstance(module, nn.Linear):
            raise SupsupError(f"MaskedLinear.from_module needs an nn.Linear, got {type(module).__name__}")
        config = SupsupConfig() if config is None else config
        keep_bias = config.keep_bias and module.bias is not None
        return cls(
            module.in_features, module.out_features, bias=keep_bias, config=config, layer_id=layer_id,
            weight=module.weight if config.base == "pretrained" else None,
            bias_value=module.bias if keep_bias else None,
            dtype=module.weight.dtype, device=module.weight.device,
        )

    def _ternary_capable(self) -> bool:
        return self.seed_format == 2

    def _ternary_serves(self, x: torch.Tensor) -> bool:
        """The ternary kernel serves this task forward: a format-2 signed-constant base, float32 on
        CPU with the compiled kernel, and at most :data:`TERNARY_MAX_ROWS` rows (where it was measured
        faster than the masked GEMM at every layer shape, ``bench/results/ternary/``)."""
        return (self._lazy_weight and x.dtype is torch.float32 and x.is_cpu
                and x.numel() <= TERNARY_MAX_ROWS * self.in_features
                and self._buffers["base_scale"].dtype is torch.float32 and _ternary_kernel_serves())

    def _forward_words(self, x, words):
        if self._ternary_serves(x):
            if not torch.compiler.is_compiling():  # a traced release would guard the graph on the weight's presence
                self._release_weight()  # GG inference keeps the mask bits only
            return self._forward_ternary(x, words)
        return ops.masked_linear(x, self._weight_now(), words, self._bias_now())

    def _forward_ternary(self, x, words):
        return ops.ternary_linear(x, words, self._base_seed, self.layer_id, self._scale, self._bias_now(), 2)

    def _forward_rows(self, x, ids):
        if x.dim() < 2:
            raise SupsupError(f"MaskedLinear: row task ids need a batch of rows, got input of shape {tuple(x.shape)}")
        flat = x.reshape(-1, x.shape[-1])
        per_row = flat.shape[0] // x.shape[0]  # [B, L, K] inputs: every position of row i uses task i
        ids = ids.repeat_interleave(per_row) if per_row != 1 else ids
        y = ops.masked_linear_grouped(flat.contiguous(), self.weight, self.bank, ids, self.bias)
        return y.reshape(tuple(x.shape[:-1]) + (self.out_features,))

    def _forward_dense(self, x, weight):
        return F.linear(x, weight, self._bias_now())

    def _forward_train(self, x, words, scores, score_sign):
        if not (torch.is_grad_enabled() and scores.requires_grad) and self._ternary_serves(x):
            # no score gradient to form: the open task runs the kernel its frozen mask will, so what it
            # outputs now (an evaluation between training steps) is what it outputs once frozen, bit for bit
            return self._forward_ternary(x, words)
        # the op's score gradient (dL/dy^T x) * W is exactly dL/dM, times dM/dS (sign(S) for top-k)
        return ops.masked_linear(x, self._weight_now(), words, self._bias_now(), scores=scores, score_sign=score_sign)

    def _shape_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def _pair(v, name: str) -> tuple[int, int]:
    if isinstance(v, str):
        raise SupsupError(f"MaskedConv2d: {name}={v!r} is not supported; give explicit integers")
    if isinstance(v, int):
        return (int(v), int(v))
    v = tuple(int(a) for a in v)
    if len(v) != 2:
        raise SupsupError(f"MaskedConv2d: {name} must be an int or a pair, got {v}")
    return v


class MaskedConv2d(MaskedLayerBase):
    """``nn.Conv2d`` with a supermask per task over the ``[O, I/g * kh * kw]`` view of ``W``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = False,
        config: Optional[SupsupConfig] = None,
        layer_id: int = 0,
        weight: Optional[torch.Tensor] = None,
        bias_value: Optional[torch.Tensor] = None,
        dtype: Optional[torch.dtype] = None,
        device=None,
    ) -> None:
        if bias and bias_value is None:
            raise SupsupError("MaskedConv2d(bias=True) keeps a frozen bias and needs its value (bias_value=...); "
                              "SupSup layers have no trainable bias")
        groups = int(groups)
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise SupsupError(f"MaskedConv2d: groups={groups} must divide in_channels={in_channels} "
                              f"and out_channels={out_channels}")
        self.in_channels, self.out_channels, self.groups = int(in_channels), int(out_channels), groups
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")
        self.padding = _pair(padding, "padding")
        self.dilation = _pair(dilation, "dilation")
        shape = (out_channels, in_channels // groups) + self.kernel_size
        super().__init__(shape, config, layer_id, weight, bias_value if bias else None, dtype, device)

    @classmethod
    def from_module(cls, module: nn.Conv2d, config: Optional[SupsupConfig] = None,
                    layer_id: int = 0) -> "MaskedConv2d":
        """A masked twin of ``module`` (zero padding only); its weight kept only for ``base='pretrained'``."""
        if not isinstance(module, nn.Conv2d):
            raise SupsupError(f"MaskedConv2d.from_module needs an nn.Conv2d, got {type(module).__name__}")
        if module.padding_mode != "zeros":
            raise SupsupError(f"MaskedConv2d supports padding_mode='zeros' only, got {module.padding_mode!r}")
        padding = module.padding
        if isinstance(padding, str):  # 'valid' / 'same' resolved for the stride-1 case nn.Conv2d allows
            if padding == "valid":
                padding = (0, 0)
            else:
                padding = tuple(d * (k - 1) // 2 for d, k in zip(module.dilation, module.kernel_size))
                if any((d * (k - 1)) % 2 for d, k in zip(module.dilation, module.kernel_size)):
                    raise SupsupError("MaskedConv2d: padding='same' with an even effective kernel pads "
                                      "asymmetrically; not supported")
        config = SupsupConfig() if config is None else config
        keep_bias = config.keep_bias and module.bias is not None
        return cls(
            module.in_channels, module.out_channels, module.kernel_size, module.stride, padding, module.dilation,
            module.groups, bias=keep_bias, config=config, layer_id=layer_id,
            weight=module.weight if config.base == "pretrained" else None,
            bias_value=module.bias if keep_bias else None,
            dtype=module.weight.dtype, device=module.weight.device,
        )

    def _forward_words(self, x, words):
        return ops.masked_conv2d(x, self._weight_now(), words, self._bias_now(), self.stride, self.padding,
                                 self.dilation, self.groups)

    def _forward_dense(self, x, weight):
        return F.conv2d(x, weight, self._bias_now(), self.stride, self.padding, self.dilation, self.groups)

    def _forward_train(self, x, words, scores, score_sign):
        # W * M from the bits, with the straight-through gradient dL/dW_eff * W (* sign(S) for top-k) into S
        return self._forward_dense(x, ops.apply_mask(self._weight_now(), words, scores=scores, score_sign=score_sign))

    def _shape_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}")
