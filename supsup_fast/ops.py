"""The op layer: ``torch.library`` ops, their fake kernels and autograd, and the backend registry.

Every op is defined once in the ``supsup_fast`` namespace (``torch.ops.supsup_fast.<op>``), with
a fake (meta) kernel so ``torch.compile`` and ``opcheck`` see shapes, and autograd registered at
import. The op's real kernel asks the registry for a backend: the first, by priority, that
implements the op for the inputs' device and dtype and does not decline them. Backends:

=============  ========================================================================
``cuda``       C++/CUDA kernels (``csrc/cuda``), when the extension was built with CUDA
``triton``     Triton kernels (``supsup_fast.kernels``) on CUDA tensors
``cpu_ext``    C++ CPU kernels (``csrc/cpu``), the compiled extension ``supsup_fast._C``
``reference``  pure PyTorch (:mod:`supsup_fast.reference`), every device, always available
=============  ========================================================================

``SUPSUP_FAST_BACKEND=<name>`` (or ``op=name,op=name``) forces a backend; a forced backend that
declines an input raises :class:`~supsup_fast.errors.BackendError` with its reason.
``python -m supsup_fast info`` prints what is active.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from . import amp
from . import reference as ref
from .errors import BackendError, SupsupError
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .format import words_per_row

ENV_BACKEND = "SUPSUP_FAST_BACKEND"
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
OPS = (
    "pack_masks",
    "unpack_masks",
    "apply_mask",
    "masked_linear",
    "masked_linear_grad_input",
    "masked_weight_grad",
    "masked_conv2d",
    "superpose",
    "mask_dots",
    "masked_linear_grouped",
    "masked_linear_grouped_grad_input",
    "masked_linear_seeded",
)


# ======================================================================================
# Backend registry
# ======================================================================================
@dataclass
class Backend:
    """A set of kernels for some devices and dtypes.

    ``check(op, args)`` may return a string: the reason this backend declines these inputs.
    """

    name: str
    priority: int
    devices: tuple[str, ...]
    impls: dict[str, Callable] = field(default_factory=dict)
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES
    available: bool = True
    why_unavailable: str = ""
    check: Optional[Callable[[str, tuple], Optional[str]]] = None

    def static_decline(self, op: str, device_type: str, dtype: Optional[torch.dtype]) -> Optional[str]:
        if not self.available:
            return f"{self.name} is unavailable: {self.why_unavailable}"
        if op not in self.impls:
            return f"{self.name} does not implement {op}"
        if device_type not in self.devices:
            return f"{self.name} runs on {'/'.join(self.devices)} tensors, not {device_type}"
        if dtype is not None and dtype not in self.dtypes:
            return f"{self.name} does not support dtype {dtype} for {op}"
        return None

    def decline(self, op: str, device_type: str, dtype: Optional[torch.dtype], args: tuple) -> Optional[str]:
        why = self.static_decline(op, device_type, dtype)
        if why is None and self.check is not None:
            why = self.check(op, args)
        return why


_BACKENDS: dict[str, Backend] = {}
_CANDIDATES: dict[tuple, list[Backend]] = {}  # (op, device, dtype, forced) -> backends passing static checks
# (op, device, dtype, SUPSUP_FAST_BACKEND) -> the kernel, when the first candidate has no per-call check
_DIRECT_IMPLS: dict[tuple, Callable] = {}
_forced_override: Optional[dict[str, str]] = None


def _clear_choice_caches() -> None:
    _CANDIDATES.clear()
    _DIRECT_IMPLS.clear()


def register_backend(backend: Backend) -> None:
    """Add (or replace) a backend; higher ``priority`` is tried first."""
    _BACKENDS[backend.name] = backend
    _clear_choice_caches()


def backends() -> list[Backend]:
    return sorted(_BACKENDS.values(), key=lambda b: -b.priority)


def _parse_forced(text: str) -> dict[str, str]:
    forced: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        op, _, name = part.rpartition("=")
        forced[op or "*"] = name
    return forced


def forced_backends() -> dict[str, str]:
    """``{op or '*': backend}`` from :func:`force_backend` or ``SUPSUP_FAST_BACKEND``."""
    if _forced_override is not None:
        return _forced_override
    return _parse_forced_cached(os.environ.get(ENV_BACKEND, ""))


@functools.lru_cache(maxsize=8)
def _parse_forced_cached(text: str) -> dict[str, str]:
    return _parse_forced(text)


@contextlib.contextmanager
def force_backend(spec: Optional[str]):
    """Force a backend for the duration of a ``with`` block (``None`` = automatic choice).

    ``spec`` has the same syntax as ``SUPSUP_FAST_BACKEND``: ``"reference"`` or ``"mask_dots=cpu_ext"``.
    """
    global _forced_override
    saved = _forced_override
    _forced_override = _parse_forced(spec or "")
    _clear_choice_caches()
    try:
        yield
    finally:
        _forced_override = saved
        _clear_choice_caches()


def _candidates(op: str, device_type: str, dtype: Optional[torch.dtype]) -> list[Backend]:
    forced = forced_backends()
    name = forced.get(op, forced.get("*"))
    key = (op, device_type, dtype, name)
    found = _CANDIDATES.get(key)
    if found is not None:
        return found
    if name is not None:
        if name not in _BACKENDS:
            raise BackendError(f"{ENV_BACKEND} names unknown backend {name!r}; known: {sorted(_BACKENDS)}")
        b = _BACKENDS[name]
        why = b.static_decline(op, device_type, dtype)
        if why is not None:
            raise BackendError(f"forced backend {name!r} cannot run {op} on {device_type}/{dtype}: {why}")
        found = [b]
    else:
        found = [b for b in backends() if b.static_decline(op, device_type, dtype) is None]
    _CANDIDATES[key] = found
    return found


def choose(op: str, device_type: str, dtype: Optional[torch.dtype], args: tuple = ()) -> Backend:
    """The backend that runs ``op`` on these inputs, or a :class:`BackendError` listing every reason."""
    cands = _candidates(op, device_type, dtype)
    reasons = []
    for b in cands:
        why = b.check(op, args) if b.check is not None else None
        if why is None:
            return b
        reasons.append(f"{b.name}: {why}")
    if not reasons:
        reasons = [f"{b.name}: {b.static_decline(op, device_type, dtype)}" for b in backends()]
    forced = forced_backends()
    prefix = "forced backend declined" if forced else "no backend accepts"
    raise BackendError(f"{prefix} {op} on {device_type}/{dtype}: " + "; ".join(reasons))


def _run(op: str, device_type: str, dtype: Optional[torch.dtype], *args):
    return choose(op, device_type, dtype, args).impls[op](*args)


register_backend(
    Backend(
        name="reference",
        priority=0,
        devices=("cpu", "cuda", "meta", "mps", "xpu"),
        impls={op: getattr(ref, op) for op in OPS},
    )
)


# ======================================================================================
# Op definitions
# ======================================================================================
_lib = torch.library.Library("supsup_fast", "DEF")  # noqa: TOR901 - the library owns this namespace

_SCHEMAS = {
    "pack_masks": "pack_masks(Tensor masks) -> Tensor",
    "unpack_masks": "unpack_masks(Tensor words, SymInt k, ScalarType dtype) -> Tensor",
    "apply_mask": "apply_mask(Tensor weight, Tensor mask_words) -> Tensor",
    "apply_mask_st": "apply_mask_st(Tensor weight, Tensor mask_words, Tensor scores, bool score_sign=False) -> Tensor",
    "masked_linear": "masked_linear(Tensor x, Tensor weight, Tensor mask_words, Tensor? bias) -> Tensor",
    "masked_linear_st": (
        "masked_linear_st(Tensor x, Tensor weight, Tensor mask_words, Tensor scores, Tensor? bias, "
        "bool score_sign=False) -> Tensor"
    ),
    "masked_linear_grad_input": "masked_linear_grad_input(Tensor grad_out, Tensor weight, Tensor mask_words) -> Tensor",
    "masked_weight_grad": "masked_weight_grad(Tensor grad_out, Tensor x, Tensor weight) -> Tensor",
    "masked_conv2d": (
        "masked_conv2d(Tensor x, Tensor weight, Tensor mask_words, Tensor? bias, int[2] stride, "
        "int[2] padding, int[2] dilation, int groups) -> Tensor"
    ),
    "superpose": "superpose(Tensor weight, Tensor bank, Tensor alpha) -> Tensor",
    "mask_dots": "mask_dots(Tensor v, Tensor bank) -> Tensor",
    "masked_linear_grouped": (
        "masked_linear_grouped(Tensor x, Tensor weight, Tensor bank, Tensor task_ids, Tensor? bias) -> Tensor"
    ),
    "masked_linear_grouped_grad_input": (
        "masked_linear_grouped_grad_input(Tensor grad_out, Tensor weight, Tensor bank, Tensor task_ids) -> Tensor"
    ),
    "masked_linear_seeded": (
        "masked_linear_seeded(Tensor x, Tensor mask_words, int seed, int layer, float scale, Tensor? bias) -> Tensor"
    ),
}
for _schema in _SCHEMAS.values():
    _lib.define(_schema)

_op = torch.ops.supsup_fast


def _impl(name: str):
    def deco(fn):
        _lib.impl(name, fn, "CompositeExplicitAutograd")
        return fn

    return deco


# ---- real kernels: ask the registry -------------------------------------------------
@_impl("pack_masks")
def _pack_masks(masks):
    return _run("pack_masks", masks.device.type, None, masks)


@_impl("unpack_masks")
def _unpack_masks(words, k, dtype):
    return _run("unpack_masks", words.device.type, None, words, k, dtype)


@_impl("apply_mask")
def _apply_mask(weight, mask_words):
    return _run("apply_mask", weight.device.type, weight.dtype, weight, mask_words)


@_impl("apply_mask_st")
def _apply_mask_st(weight, mask_words, scores, score_sign=False):
    return _run("apply_mask", weight.device.type, weight.dtype, weight, mask_words)


@_impl("masked_linear")
def _masked_linear(x, weight, mask_words, bias):
    return _run("masked_linear", x.device.type, x.dtype, x, weight, mask_words, bias)


@_impl("masked_linear_st")
def _masked_linear_st(x, weight, mask_words, scores, bias, score_sign=False):
    return _run("masked_linear", x.device.type, x.dtype, x, weight, mask_words, bias)


@_impl("masked_linear_grad_input")
def _masked_linear_grad_input(grad_out, weight, mask_words):
    return _run("masked_linear_grad_input", grad_out.device.type, grad_out.dtype, grad_out, weight, mask_words)


@_impl("masked_weight_grad")
def _masked_weight_grad(grad_out, x, weight):
    return _run("masked_weight_grad", x.device.type, x.dtype, grad_out, x, weight)


@_impl("masked_conv2d")
def _masked_conv2d(x, weight, mask_words, bias, stride, padding, dilation, groups):
    return _run(
        "masked_conv2d", x.device.type, x.dtype, x, weight, mask_words, bias, stride, padding, dilation, groups
    )


@_impl("superpose")
def _superpose(weight, bank, alpha):
    return _run("superpose", weight.device.type, weight.dtype, weight, bank, alpha)


@_impl("mask_dots")
def _mask_dots(v, bank):
    return _run("mask_dots", v.device.type, v.dtype, v, bank)


@_impl("masked_linear_grouped")
def _masked_linear_grouped(x, weight, bank, task_ids, bias):
    return _run("masked_linear_grouped", x.device.type, x.dtype, x, weight, bank, task_ids, bias)


@_impl("masked_linear_grouped_grad_input")
def _masked_linear_grouped_grad_input(grad_out, weight, bank, task_ids):
    return _run("masked_linear_grouped_grad_input", grad_out.device.type, grad_out.dtype, grad_out, weight, bank,
                task_ids)


@_impl("masked_linear_seeded")
def _masked_linear_seeded(x, mask_words, seed, layer, scale, bias):
    return _run("masked_linear_seeded", x.device.type, x.dtype, x, mask_words, seed, layer, scale, bias)


# ---- the eager fast path ------------------------------------------------------------------
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
_DTYPE_FREE_OPS = ("pack_masks", "unpack_masks")
# straight-through ops run the plain kernel: the scores only matter to autograd
_DIRECT_KERNEL = {
    "masked_linear_st": ("masked_linear", lambda a: (a[0], a[1], a[2], a[4])),
    "apply_mask_st": ("apply_mask", lambda a: (a[0], a[1])),
}


def _traced() -> bool:
    """Whether tensors are being traced or transformed: torch.compile, a dispatch mode, or a
    functorch transform (a vmapped tensor has no storage a kernel could read)."""
    return (torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None
            or torch._C._are_functorch_transforms_active())


def _plain_eager(args) -> bool:
    """Whether a call may bypass the dispatcher's wrappers: not :func:`_traced`, plain tensors."""
    if _traced():
        return False
    return all(type(a) in _PLAIN_TENSORS for a in args if isinstance(a, torch.Tensor))


def _direct(args) -> bool:
    """Whether a call may skip the dispatcher altogether: :func:`_plain_eager` with no autograd to
    record (a plain ``autograd.Function`` may record it instead, see :class:`_MaskedLinearST`)."""
    if _traced():
        return False
    grad = torch.is_grad_enabled()
    for a in args:  # one loop: this runs on every eager call
        if isinstance(a, torch.Tensor) and (type(a) not in _PLAIN_TENSORS or (grad and a.requires_grad)):
            return False
    return True


def _direct_impl(op: str, device_type: str, dtype: Optional[torch.dtype], args: tuple) -> Callable:
    """The kernel :func:`choose` would pick, from a cache when no per-call check can decline.
    Keyed on the environment's forced backend too, so changing ``SUPSUP_FAST_BACKEND`` takes
    effect at once (``force_backend`` and ``register_backend`` clear the cache)."""
    key = (op, device_type, dtype, os.environ.get(ENV_BACKEND, ""))
    impl = _DIRECT_IMPLS.get(key)
    if impl is not None:
        return impl
    cands = _candidates(op, device_type, dtype)
    if cands and cands[0].check is None:
        impl = _DIRECT_IMPLS[key] = cands[0].impls[op]
        return impl
    return choose(op, device_type, dtype, args).impls[op]


class _FastOps:
    """``_fast.<op>(*args)`` calls the registry's kernel directly when :func:`_direct` allows it
    (saving the dispatcher and autograd wrapper, tens of microseconds per call on small layers)
    and the ``torch.library`` op otherwise (autograd, torch.compile, tensor subclasses, modes)."""

    def __getattr__(self, name: str):
        op = getattr(_op, name)
        kname, pick = _DIRECT_KERNEL.get(name, (name, None))
        dtype_free = kname in _DTYPE_FREE_OPS

        def call(*args):
            if _direct(args):
                first = args[0]
                if pick is not None:
                    args = pick(args)
                return _direct_impl(kname, first.device.type, None if dtype_free else first.dtype, args)(*args)
            return op(*args)

        setattr(self, name, call)
        return call


_fast = _FastOps()


# ---- fake kernels: shapes only --------------------------------------------------------
@torch.library.register_fake("supsup_fast::pack_masks")
def _pack_masks_fake(masks):
    return masks.new_empty((*masks.shape[:-1], words_per_row(masks.shape[-1])), dtype=torch.int32)


@torch.library.register_fake("supsup_fast::unpack_masks")
def _unpack_masks_fake(words, k, dtype):
    return words.new_empty((*words.shape[:-1], k), dtype=dtype)


@torch.library.register_fake("supsup_fast::apply_mask")
def _apply_mask_fake(weight, mask_words):
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


@torch.library.register_fake("supsup_fast::apply_mask_st")
def _apply_mask_st_fake(weight, mask_words, scores, score_sign=False):
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


@torch.library.register_fake("supsup_fast::masked_linear")
def _masked_linear_fake(x, weight, mask_words, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake("supsup_fast::masked_linear_st")
def _masked_linear_st_fake(x, weight, mask_words, scores, bias, score_sign=False):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake("supsup_fast::masked_linear_grad_input")
def _masked_linear_grad_input_fake(grad_out, weight, mask_words):
    return grad_out.new_empty((*grad_out.shape[:-1], weight.shape[1]))


@torch.library.register_fake("supsup_fast::masked_weight_grad")
def _masked_weight_grad_fake(grad_out, x, weight):
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


def _conv_out(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


@torch.library.register_fake("supsup_fast::masked_conv2d")
def _masked_conv2d_fake(x, weight, mask_words, bias, stride, padding, dilation, groups):
    h = _conv_out(x.shape[-2], weight.shape[2], stride[0], padding[0], dilation[0])
    w = _conv_out(x.shape[-1], weight.shape[3], stride[1], padding[1], dilation[1])
    return x.new_empty((*x.shape[:-3], weight.shape[0], h, w))


@torch.library.register_fake("supsup_fast::superpose")
def _superpose_fake(weight, bank, alpha):
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


@torch.library.register_fake("supsup_fast::mask_dots")
def _mask_dots_fake(v, bank):
    lead = () if v.dim() == 2 else (v.shape[0],)
    return v.new_empty((*lead, bank.shape[0]))


@torch.library.register_fake("supsup_fast::masked_linear_grouped")
def _masked_linear_grouped_fake(x, weight, bank, task_ids, bias):
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.register_fake("supsup_fast::masked_linear_grouped_grad_input")
def _masked_linear_grouped_grad_input_fake(grad_out, weight, bank, task_ids):
    return grad_out.new_empty((grad_out.shape[0], weight.shape[1]))


@torch.library.register_fake("supsup_fast::masked_linear_seeded")
def _masked_linear_seeded_fake(x, mask_words, seed, layer, scale, bias):
    return x.new_empty((*x.shape[:-1], mask_words.shape[0]))


# ---- autograd -------------------------------------------------------------------------
def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _dense_weight_grad(grad_out, x):
    """``dL/dW_eff = dL/dy^T x`` over all leading dims."""
    return _flat(grad_out).t() @ _flat(x)


def _bias_grad(grad_out):
    return _flat(grad_out).sum(0)


def _setup_apply_mask(ctx, inputs, output):
    weight, mask_words = inputs[0], inputs[1]
    ctx.save_for_backward(weight, mask_words)


def _apply_mask_bwd(ctx, grad):
    weight, mask_words = ctx.saved_tensors
    return _fast.apply_mask(grad, mask_words), None


def _setup_apply_mask_st(ctx, inputs, output):
    weight, mask_words, scores, score_sign = inputs
    ctx.score_sign = score_sign
    ctx.save_for_backward(weight, scores if score_sign else None)


def _apply_mask_st_bwd(ctx, grad):
    weight, scores = ctx.saved_tensors
    # straight-through: d(W*M)/dM = W, and dM/dS = 1 (threshold) or sign(S) (top-k, through |S|)
    gs = grad * weight
    return None, None, gs * scores.sign() if ctx.score_sign else gs, None


def _setup_linear(ctx, inputs, output):
    x, weight, mask_words = inputs[:3]
    ctx.save_for_backward(x, weight, mask_words)
    ctx.has_bias = inputs[-1] is not None


def _masked_linear_bwd(ctx, grad):
    x, weight, mask_words = ctx.saved_tensors
    gx = gw = gb = None
    if ctx.needs_input_grad[0]:
        gx = _fast.masked_linear_grad_input(grad, weight, mask_words)
    if ctx.needs_input_grad[1]:
        gw = _fast.apply_mask(_dense_weight_grad(grad, x).to(weight.dtype), mask_words)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        gb = _bias_grad(grad)
    return gx, gw, None, gb


def _setup_linear_st(ctx, inputs, output):
    x, weight, mask_words, scores, bias, score_sign = inputs
    ctx.save_for_backward(x, weight, mask_words, scores if score_sign else None)
    ctx.has_bias, ctx.score_sign = bias is not None, score_sign


#: ``(masked_weight_grad kernel, its fused * sign(S) twin)`` of the compiled CPU backend, set by
#: :mod:`supsup_fast._native`; the twin serves only where that kernel is the one chosen.
SIGN_FUSED_WEIGHT_GRAD: Optional[tuple[Callable, Callable]] = None


def _signed_score_grad(grad, x, weight, scores):
    """``(dL/dy^T x) * W * sign(S)``: the top-k binariser's score gradient (dM/dS = sign(S))."""
    fused = SIGN_FUSED_WEIGHT_GRAD
    if (fused is not None and x.device.type == "cpu" and scores.dtype == weight.dtype
            and _direct((grad, x, weight, scores))):
        if _direct_impl("masked_weight_grad", "cpu", x.dtype, (grad, x, weight)) is fused[0]:
            return fused[1](grad, x, weight, scores)  # the sign in the GEMM's epilogue: no extra pass
    return _fast.masked_weight_grad(grad, x, weight) * scores.sign()


class _MaskedLinearST(torch.autograd.Function):
    """The ``masked_linear_st`` op's autograd for plain eager tensors, without the dispatcher's
    autograd wrapper (the kernel is the registry's, the backward is the op's own): ~25 us less per
    training forward and backward, which is most of a small layer's cost."""

    @staticmethod
    def forward(ctx, x, weight, mask_words, scores, bias, score_sign, kernel):
        _setup_linear_st(ctx, (x, weight, mask_words, scores, bias, score_sign), None)
        return kernel(x, weight, mask_words, bias)

    @staticmethod
    def backward(ctx, grad):
        return (*_masked_linear_st_bwd(ctx, grad), None)


def _masked_linear_st_bwd(ctx, grad):
    x, weight, mask_words, scores = ctx.saved_tensors
    gx = gs = gb = None
    if ctx.needs_input_grad[0]:
        gx = _fast.masked_linear_grad_input(grad, weight, mask_words)
    if ctx.needs_input_grad[3]:
        gs = _signed_score_grad(grad, x, weight, scores) if ctx.score_sign else _fast.masked_weight_grad(grad, x, weight)
    if ctx.has_bias and ctx.needs_input_grad[4]:
        gb = _bias_grad(grad)
    return gx, None, None, gs, gb, None


class _MaskedConv2dEager(torch.autograd.Function):
    """The ``masked_conv2d`` op's autograd for plain eager tensors, without the dispatcher's
    autograd wrapper (the kernel is the registry's, the backward is the op's own)."""

    @staticmethod
    def forward(ctx, x, weight, mask_words, bias, stride, padding, dilation, groups, kernel):
        _setup_conv(ctx, (x, weight, mask_words, bias, stride, padding, dilation, groups), None)
        return kernel(x, weight, mask_words, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        return (*_masked_conv2d_bwd(ctx, grad), None)


def _setup_conv(ctx, inputs, output):
    x, weight, mask_words, bias, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(x, weight, mask_words)
    ctx.conf = (list(stride), list(padding), list(dilation), groups)
    ctx.bias_shape = None if bias is None else list(bias.shape)


def _masked_conv2d_bwd(ctx, grad):
    x, weight, mask_words = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.conf
    w_eff = _fast.apply_mask(weight, mask_words)
    need = ctx.needs_input_grad
    gx, gw, gb = torch.ops.aten.convolution_backward(
        grad, x, w_eff, ctx.bias_shape, stride, padding, dilation, False, [0, 0], groups,
        [need[0], need[1], ctx.bias_shape is not None and need[3]],
    )
    if gw is not None:
        gw = _fast.apply_mask(gw, mask_words)
    return gx, gw, None, gb, None, None, None, None


def _setup_superpose(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _superpose_bwd(ctx, grad):
    weight, bank, alpha = ctx.saved_tensors
    gw = ga = None
    if ctx.needs_input_grad[0]:
        gw = _fast.superpose(grad.contiguous(), bank, alpha)
    if ctx.needs_input_grad[2]:
        # half-precision weights: form v and its dots in float32, alpha's gradient sums many terms
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        v = (grad.to(acc) * weight.to(acc)).reshape(weight.shape[0], -1)
        ga = _fast.mask_dots(v, bank).to(alpha.dtype)
    return gw, None, ga


def _setup_mask_dots(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _mask_dots_bwd(ctx, grad):
    v, bank = ctx.saved_tensors
    # d<v, M_t>/dv = M_t, so dL/dv_r = sum_t g_rt M_t: a superposition with unit weight
    ones = torch.ones(v.shape[-2:], dtype=v.dtype, device=v.device)
    if v.dim() == 2:
        return _fast.superpose(ones, bank, grad.to(v.dtype)), None
    return torch.stack([_fast.superpose(ones, bank, g.to(v.dtype)) for g in grad.unbind(0)]), None


def _setup_grouped(ctx, inputs, output):
    x, weight, bank, task_ids, bias = inputs
    ctx.save_for_backward(weight, bank, task_ids)
    ctx.has_bias = bias is not None


def _masked_linear_grouped_bwd(ctx, grad):
    weight, bank, task_ids = ctx.saved_tensors
    gx = gb = None
    if ctx.needs_input_grad[0]:
        gx = _fast.masked_linear_grouped_grad_input(grad, weight, bank, task_ids)
    if ctx.has_bias and ctx.needs_input_grad[4]:
        gb = _bias_grad(grad)
    return gx, None, None, None, gb


def _setup_seeded(ctx, inputs, output):
    x, mask_words, seed, layer, scale, bias = inputs
    ctx.save_for_backward(mask_words)
    ctx.conf = (seed, layer, scale, x.shape[-1], x.dtype)
    ctx.has_bias = bias is not None


def _masked_linear_seeded_bwd(ctx, grad):
    (mask_words,) = ctx.saved_tensors
    seed, layer, scale, k, dtype = ctx.conf
    gx = gb = None
    if ctx.needs_input_grad[0]:
        signs = ref.signed_constant_signs(seed, layer, mask_words.shape[0] * k, grad.device)
        weight = torch.where(signs, scale, -scale).to(dtype).reshape(mask_words.shape[0], k)
        gx = _fast.masked_linear_grad_input(grad, weight, mask_words)
    if ctx.has_bias and ctx.needs_input_grad[5]:
        gb = _bias_grad(grad)
    return gx, None, None, None, None, gb


def _setup_grad_input(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _masked_linear_grad_input_bwd(ctx, gg):
    # grad_out @ (W*M) is linear in grad_out: its vector-Jacobian product is gg @ (W*M)^T
    grad_out, weight, mask_words = ctx.saved_tensors
    return _fast.masked_linear(gg, weight, mask_words, None), None, None


def _setup_weight_grad(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _masked_weight_grad_bwd(ctx, gg):
    # (g^T x) * W is bilinear in (g, x): d/dg = x (gg*W)^T, d/dx = g (gg*W)
    grad_out, x, weight = ctx.saved_tensors
    v = gg * weight
    gg_out = gx = None
    if ctx.needs_input_grad[0]:
        gg_out = (_flat(x) @ v.t().to(x.dtype)).reshape(grad_out.shape)
    if ctx.needs_input_grad[1]:
        gx = (_flat(grad_out) @ v.to(grad_out.dtype)).reshape(x.shape)
    return gg_out, gx, None


def _setup_grouped_grad_input(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _masked_linear_grouped_grad_input_bwd(ctx, gg):
    grad_out, weight, bank, task_ids = ctx.saved_tensors
    return _fast.masked_linear_grouped(gg, weight, bank, task_ids, None), None, None, None


torch.library.register_autograd(
    "supsup_fast::masked_linear_grouped_grad_input", _masked_linear_grouped_grad_input_bwd,
    setup_context=_setup_grouped_grad_input,
)
torch.library.register_autograd(
    "supsup_fast::masked_linear_grad_input", _masked_linear_grad_input_bwd, setup_context=_setup_grad_input
)
torch.library.register_autograd(
    "supsup_fast::masked_weight_grad", _masked_weight_grad_bwd, setup_context=_setup_weight_grad
)
torch.library.register_autograd(
    "supsup_fast::masked_linear_grouped", _masked_linear_grouped_bwd, setup_context=_setup_grouped
)
torch.library.register_autograd(
    "supsup_fast::masked_linear_seeded", _masked_linear_seeded_bwd, setup_context=_setup_seeded
)
torch.library.register_autograd("supsup_fast::apply_mask", _apply_mask_bwd, setup_context=_setup_apply_mask)
torch.library.register_autograd("supsup_fast::apply_mask_st", _apply_mask_st_bwd, setup_context=_setup_apply_mask_st)
torch.library.register_autograd("supsup_fast::masked_linear", _masked_linear_bwd, setup_context=_setup_linear)
torch.library.register_autograd("supsup_fast::masked_linear_st", _masked_linear_st_bwd, setup_context=_setup_linear_st)
torch.library.register_autograd("supsup_fast::masked_conv2d", _masked_conv2d_bwd, setup_context=_setup_conv)
torch.library.register_autograd("supsup_fast::superpose", _superpose_bwd, setup_context=_setup_superpose)
torch.library.register_autograd("supsup_fast::mask_dots", _mask_dots_bwd, setup_context=_setup_mask_dots)


# ======================================================================================
# Public, validated entry points
# ======================================================================================
def _require(cond: bool, msg) -> None:
    """Raise :class:`SupsupError` unless ``cond``; ``msg`` may be a callable so the hot path formats nothing."""
    if not cond:
        raise SupsupError(msg() if callable(msg) else msg)


def _check_float(name: str, t: torch.Tensor) -> None:
    _require(t.dtype in FLOAT_DTYPES, lambda: f"{name} must be a floating tensor (fp16/bf16/fp32/fp64), got {t.dtype}")


def _check_words(name: str, words: torch.Tensor, n: int, k: int, lead: int) -> None:
    _require(words.dtype == torch.int32, lambda: f"{name} must be int32 packed words, got {words.dtype}")
    want = (n, words_per_row(k))
    _require(
        words.dim() == 2 + lead and tuple(words.shape[lead:]) == want,
        lambda: f"{name} has shape {tuple(words.shape)}, expected {'[T, ' if lead else '['}{want[0]}, {want[1]}] "
        f"for a weight with N={n}, K={k}",
    )


def _check_same_device(**tensors: Optional[torch.Tensor]) -> None:
    first = None
    for t in tensors.values():
        if t is not None:
            if first is None:
                first = t.device
            elif t.device != first:
                break
    else:
        return
    devs = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devs.values())) > 1:
        raise SupsupError("tensors are on different devices: " + ", ".join(f"{n}={d}" for n, d in devs.items()))


def _nk(weight: torch.Tensor) -> tuple[int, int]:
    n = weight.shape[0]
    return n, (weight.numel() // n if n else 0)


def pack_masks(masks: torch.Tensor) -> torch.Tensor:
    """Masks ``[..., N, K]`` (non-zero = kept) -> int32 words ``[..., N, ceil(K/32)]``."""
    _require(masks.dim() >= 2, lambda: f"pack_masks needs masks of at least 2 dims [.., N, K], got shape {tuple(masks.shape)}")
    return _fast.pack_masks(masks)


def unpack_masks(words: torch.Tensor, k: int, dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """int32 words ``[..., N, W]`` -> masks ``[..., N, k]`` of ``dtype``."""
    _require(words.dtype == torch.int32, lambda: f"unpack_masks needs int32 words, got {words.dtype}")
    _require(words.dim() >= 2, lambda: f"unpack_masks needs words of at least 2 dims, got shape {tuple(words.shape)}")
    _require(
        words.shape[-1] == words_per_row(k),
        lambda: f"unpack_masks: {words.shape[-1]} words per row cannot hold k={k} bits (needs {words_per_row(k)})",
    )
    return _fast.unpack_masks(words, k, dtype)


def apply_mask(weight: torch.Tensor, mask_words: torch.Tensor, scores: Optional[torch.Tensor] = None,
               score_sign: bool = False) -> torch.Tensor:
    """``W * M``. With ``scores``, gradients flow straight through to them (training):
    ``dL/dscores = dL/d(W*M) * W``, times ``sign(scores)`` with ``score_sign`` (see :func:`masked_linear`)."""
    _check_float("weight", weight)
    n, k = _nk(weight)
    _check_words("mask_words", mask_words, n, k, 0)
    _check_same_device(weight=weight, mask_words=mask_words, scores=scores)
    if scores is None:
        return _fast.apply_mask(weight, mask_words)
    _require(scores.shape == weight.shape, lambda: f"scores shape {tuple(scores.shape)} != weight shape {tuple(weight.shape)}")
    return _fast.apply_mask_st(weight, mask_words, scores, bool(score_sign))


def _check_linear(x, weight, mask_words, bias):
    # the common case in one expression; any failure re-runs the checks that name the problem
    wshape, dev = weight.shape, weight.device
    if (len(wshape) == 2 and x.dtype == weight.dtype and x.dtype in FLOAT_DTYPES and x.dim() >= 1
            and x.shape[-1] == wshape[1] and mask_words.dtype == torch.int32
            and mask_words.shape == (wshape[0], words_per_row(wshape[1])) and x.device == dev
            and mask_words.device == dev
            and (bias is None or (bias.shape == (wshape[0],) and bias.dtype == x.dtype and bias.device == dev))):
        return
    _check_float("x", x)
    _require(weight.dim() == 2, lambda: f"masked_linear weight must be [N, K], got shape {tuple(weight.shape)}")
    _require(x.dtype == weight.dtype, lambda: f"x dtype {x.dtype} != weight dtype {weight.dtype}")
    _require(x.dim() >= 1 and x.shape[-1] == weight.shape[1],
             lambda: f"x has shape {tuple(x.shape)}; its last dim must be K={weight.shape[1]}")
    _check_words("mask_words", mask_words, weight.shape[0], weight.shape[1], 0)
    if bias is not None:
        _require(bias.shape == (weight.shape[0],), lambda: f"bias shape {tuple(bias.shape)} != ({weight.shape[0]},)")
        _require(bias.dtype == x.dtype, lambda: f"bias dtype {bias.dtype} != x dtype {x.dtype}")
    _check_same_device(x=x, weight=weight, mask_words=mask_words, bias=bias)


def masked_linear(x, weight, mask_words, bias=None, scores=None, score_sign=False):
    """``y = x (W * M)^T + b`` for one task's packed mask.

    With ``scores`` (same shape as ``weight``), the mask's gradient flows straight through to
    them: ``dL/dscores = (dL/dy^T x) * W`` (training a supermask whose mask is ``[S >= 0]``).
    ``score_sign=True`` is for a mask chosen by ``|S|`` (the top-k binariser): the straight-through
    derivative is ``sign(S)``, and ``dL/dscores = (dL/dy^T x) * W * sign(S)`` -- on the compiled
    CPU backend in the weight-gradient GEMM's epilogue, with no pass of its own.
    """
    if amp.enabled(x.device.type):  # cast like F.linear under torch.autocast
        x, weight, bias, scores = amp.linear_args(x, weight, bias, scores)
    _check_linear(x, weight, mask_words, bias)
    if scores is None:
        args = (x, weight, mask_words, bias)
        if _direct(args):  # _fast.masked_linear, inlined: this is the GEMV-sized inference hot path
            return _direct_impl("masked_linear", x.device.type, x.dtype, args)(*args)
        return _op.masked_linear(*args)
    _require(scores.shape == weight.shape, lambda: f"scores shape {tuple(scores.shape)} != weight shape {tuple(weight.shape)}")
    args = (x, weight, mask_words, scores, bias)
    if torch.is_grad_enabled() and _plain_eager(args):
        kernel = _direct_impl("masked_linear", x.device.type, x.dtype, (x, weight, mask_words, bias))
        return _MaskedLinearST.apply(*args, bool(score_sign), kernel)
    return _fast.masked_linear_st(*args, bool(score_sign))


def masked_conv2d(x, weight, mask_words, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """``conv2d(x, W * M) + b`` for one task's packed mask."""
    _check_float("x", x)
    _require(weight.dim() == 4, lambda: f"masked_conv2d weight must be [O, I/g, kh, kw], got shape {tuple(weight.shape)}")
    _require(x.dim() in (3, 4), lambda: f"masked_conv2d input must be [B, C, H, W] or [C, H, W], got {tuple(x.shape)}")
    _require(x.dtype == weight.dtype, lambda: f"x dtype {x.dtype} != weight dtype {weight.dtype}")
    _require(x.shape[-3] == weight.shape[1] * groups,
             lambda: f"x has {x.shape[-3]} channels, weight expects {weight.shape[1] * groups} (groups={groups})")
    n, k = _nk(weight)
    _check_words("mask_words", mask_words, n, k, 0)
    _check_same_device(x=x, weight=weight, mask_words=mask_words, bias=bias)
    pair = lambda v: [int(v), int(v)] if isinstance(v, int) else [int(a) for a in v]  # noqa: E731
    args = (x, weight, mask_words, bias, pair(stride), pair(padding), pair(dilation), int(groups))
    if _direct(args):  # nothing for autograd to record
        return _direct_impl("masked_conv2d", x.device.type, x.dtype, args)(*args)
    if _plain_eager(args):
        return _MaskedConv2dEager.apply(*args, _direct_impl("masked_conv2d", x.device.type, x.dtype, args))
    return _op.masked_conv2d(*args)


def superpose(weight: torch.Tensor, bank: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``W * sum_t alpha_t M_t`` over a bank ``[T, N, W]``, skipping ``alpha_t = 0``."""
    _check_float("weight", weight)
    n, k = _nk(weight)
    _check_words("bank", bank, n, k, 1)
    _require(alpha.dim() == 1 and alpha.shape[0] == bank.shape[0],
             lambda: f"alpha has shape {tuple(alpha.shape)}, expected [{bank.shape[0]}] (one weight per task)")
    _require(alpha.is_floating_point(), lambda: f"alpha must be floating, got {alpha.dtype}")
    _check_same_device(weight=weight, bank=bank, alpha=alpha)
    return _fast.superpose(weight, bank, alpha)


def mask_dots(v: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """``<v_r, M_t>`` for all rows and tasks: ``v [R, N, K]`` or ``[N, K]`` -> ``[R, T]`` or ``[T]``."""
    _check_float("v", v)
    _require(v.dim() in (2, 3), lambda: f"mask_dots needs v of shape [N, K] or [R, N, K], got {tuple(v.shape)}")
    _check_words("bank", bank, v.shape[-2], v.shape[-1], 1)
    _check_same_device(v=v, bank=bank)
    return _fast.mask_dots(v, bank)


def masked_linear_grouped(x, weight, bank, task_ids, bias=None):
    """Row ``i`` of ``x [M, K]`` through task ``task_ids[i]``'s mask (serving many tasks in one batch)."""
    _check_float("x", x)
    _require(x.dim() == 2, lambda: f"masked_linear_grouped needs x of shape [M, K], got {tuple(x.shape)}")
    _require(x.dtype == weight.dtype, lambda: f"x dtype {x.dtype} != weight dtype {weight.dtype}")
    _require(weight.dim() == 2 and x.shape[1] == weight.shape[1],
             lambda: f"x {tuple(x.shape)} and weight {tuple(weight.shape)} disagree on K")
    _check_words("bank", bank, weight.shape[0], weight.shape[1], 1)
    _require(task_ids.dtype in (torch.int32, torch.int64) and task_ids.shape == (x.shape[0],),
             lambda: f"task_ids must be int32/int64 of shape [{x.shape[0]}], got {task_ids.dtype} {tuple(task_ids.shape)}")
    if task_ids.numel() and task_ids.device.type == "cuda":
        # no host sync (graph capture, fullgraph compile): an out-of-range id fails a device assert
        torch._assert_async(((task_ids >= 0) & (task_ids < bank.shape[0])).all(),
                            f"masked_linear_grouped: task id out of range [0, {bank.shape[0]})")
    elif task_ids.numel():
        lo, hi = int(task_ids.min()), int(task_ids.max())
        _require(lo >= 0 and hi < bank.shape[0], lambda: f"task id out of range [0, {bank.shape[0]}): min {lo}, max {hi}")
    _check_same_device(x=x, weight=weight, bank=bank, task_ids=task_ids, bias=bias)
    return _fast.masked_linear_grouped(x, weight, bank, task_ids.to(torch.int64), bias)


def masked_linear_seeded(x, mask_words, seed: int, layer: int, scale: float, bias=None):
    """``masked_linear`` with the signed-constant weight ``+-scale`` regenerated from ``(seed, layer)``."""
    _check_float("x", x)
    _check_words("mask_words", mask_words, mask_words.shape[0] if mask_words.dim() else 0, x.shape[-1], 0)
    _check_same_device(x=x, mask_words=mask_words, bias=bias)
    return _fast.masked_linear_seeded(x, mask_words, int(seed), int(layer), float(scale), bias)


def masked_linear_grad_input(grad_out, weight, mask_words):
    """``dL/dx = dL/dy (W * M)``."""
    return _fast.masked_linear_grad_input(grad_out, weight, mask_words)


def masked_weight_grad(grad_out, x, weight):
    """Straight-through score gradient ``(dL/dy^T x) * W``."""
    return _fast.masked_weight_grad(grad_out, x, weight)


# ======================================================================================
# Native backends register themselves on import
# ======================================================================================
from . import _native  # noqa: E402,F401  (registers cpu_ext / cuda / triton backends if present)
