"""The baselines supsup_fast is measured against, in plain PyTorch.

* ``official``: the public SupSup code's approach re-expressed in current PyTorch. Each learned
  mask is a float32 tensor; for task inference every layer keeps a float32 ``[T, N, K]`` stack
  of all masks, forms ``W * (alpha[:, None, None] * stack).sum(0)`` and gets the alpha-gradient
  from autograd (whose backward of that product is ``(grad * stack).sum((1, 2))``). Training
  re-binarises the float scores with a straight-through ``GetSubnet`` on every forward.
* ``stack_matvec``: the same float32 stack used the best way dense PyTorch allows, as one GEMV
  (``alpha @ stack.view(T, -1)``, ``stack.view(T, -1) @ v``): a stronger float baseline.
* ``two_pass``: keep the masks packed (1 bit each) but materialise floats before the dense op:
  ``W * M`` then ``F.linear`` / ``F.conv2d``, or, for many tasks, unpack chunks of the bank to
  float32 and GEMV them (so memory stays bounded).
* ``dense``: the same layer without any mask, the cost floor.
* ``numpy``: ``np.packbits`` / ``np.unpackbits`` in little bit order, for pack / unpack.

Nothing here uses a supsup_fast kernel except ``two_pass``, whose first pass is deliberately the
library's fastest ``apply_mask`` / ``unpack_masks`` (the point is the cost of the second pass).
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from supsup_fast import ops
from supsup_fast import reference as ref

#: SupSup's MNIST networks as (out_features, in_features) per layer (no biases).
NETS = {
    "lenet": [(300, 784), (100, 300), (100, 100)],  # LeNet-300-100 with 100 outputs
    "fc1024": [(1024, 784), (1024, 1024), (100, 1024)],  # FC-1024-1024 with 100 outputs
}
NUM_REAL = 10  # real classes; the other outputs are the G objective's superfluous neurons
STACK_CHUNK = 64  # tasks unpacked at a time by the bounded-memory baselines


def net_params(net: str) -> int:
    return sum(n * k for n, k in NETS[net])


def stack_bytes(net: str, num_tasks: int) -> int:
    """Bytes of the float32 ``[T, N, K]`` mask stacks of every layer (the official layout)."""
    return 4 * num_tasks * net_params(net)


# ======================================================================================
# Straight-through binariser of the official code
# ======================================================================================
class GetSubnet(torch.autograd.Function):
    """``M = (S >= 0)`` as float32, gradient passed straight through (official ``GetSubnet``)."""

    @staticmethod
    def forward(ctx, scores):
        return (scores >= 0).float()

    @staticmethod
    def backward(ctx, grad):
        return grad


class GetSubnetTopK(torch.autograd.Function):
    """Edge-popup's binariser as the official code writes it: sort, zero the smallest, one the rest."""

    @staticmethod
    def forward(ctx, scores, density):
        out = scores.clone()
        _, idx = scores.flatten().sort()
        j = int((1 - density) * scores.numel())
        flat = out.flatten()
        flat[idx[:j]] = 0
        flat[idx[j:]] = 1
        return flat.view_as(scores)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class StraightThrough(torch.autograd.Function):
    """A given float mask in the forward pass, the gradient straight through to ``scores``."""

    @staticmethod
    def forward(ctx, scores, mask):
        return mask

    @staticmethod
    def backward(ctx, grad):
        return grad, None


# ======================================================================================
# Float32 mask stacks
# ======================================================================================
def float_stack(bank: torch.Tensor, k: int, chunk: int = STACK_CHUNK) -> torch.Tensor:
    """The float32 ``[T, N, K]`` stack of a packed bank, unpacked a chunk of tasks at a time."""
    t, n, _ = bank.shape
    out = torch.empty(t, n, k, dtype=torch.float32, device=bank.device)
    for s in range(0, t, chunk):
        out[s:s + chunk] = ops.unpack_masks(bank[s:s + chunk], k, torch.float32)
    return out


def official_superpose(weight: torch.Tensor, stack: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    return weight * (alpha[:, None, None] * stack).sum(0)


def official_mask_dots(v: torch.Tensor, stack: torch.Tensor) -> torch.Tensor:
    """What autograd computes for ``d<v, sum_t alpha_t M_t>/d alpha``: a [T, N, K] product, then a sum."""
    return (v * stack).sum((1, 2))


def matvec_superpose(weight: torch.Tensor, stack: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    t = stack.shape[0]
    return weight * (alpha @ stack.view(t, -1)).view_as(weight)


def matvec_mask_dots(v: torch.Tensor, stack: torch.Tensor) -> torch.Tensor:
    return stack.view(stack.shape[0], -1) @ v.reshape(-1)


def two_pass_superpose(weight: torch.Tensor, bank: torch.Tensor, alpha: torch.Tensor,
                       chunk: int = STACK_CHUNK) -> torch.Tensor:
    """Unpack a chunk of tasks to float32, GEMV it with its alphas, accumulate; then times W."""
    n, k = weight.shape
    acc = torch.zeros(n * k, dtype=torch.float32, device=weight.device)
    for s in range(0, bank.shape[0], chunk):
        m = ops.unpack_masks(bank[s:s + chunk], k, torch.float32)
        acc.addmv_(m.view(m.shape[0], -1).t(), alpha[s:s + chunk].float())
    return weight * acc.view(n, k).to(weight.dtype)


def two_pass_mask_dots(v: torch.Tensor, bank: torch.Tensor, chunk: int = STACK_CHUNK) -> torch.Tensor:
    k = v.shape[-1]
    flat = v.reshape(-1).float()
    parts = []
    for s in range(0, bank.shape[0], chunk):
        m = ops.unpack_masks(bank[s:s + chunk], k, torch.float32)
        parts.append(m.view(m.shape[0], -1) @ flat)
    return torch.cat(parts).to(v.dtype)


def exact_superpose(weight: torch.Tensor, bank: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Float64 ``W * sum_t alpha_t M_t`` (the expected value when the reference is too slow)."""
    n, k = weight.shape[0], weight.numel() // weight.shape[0]
    acc = torch.zeros(n * k, dtype=torch.float64, device=weight.device)
    for s in range(0, bank.shape[0], STACK_CHUNK):
        m = ops.unpack_masks(bank[s:s + STACK_CHUNK], k, torch.float64)
        acc.addmv_(m.view(m.shape[0], -1).t(), alpha[s:s + STACK_CHUNK].double())
    return weight.double() * acc.view(weight.shape)


def exact_mask_dots(v: torch.Tensor, bank: torch.Tensor, rows: bool = False) -> torch.Tensor:
    """Float64 ``<v, M_t>`` for every task: ``[T]``; with ``rows``, ``v`` is ``[R, N, K]`` and the result ``[R, T]``."""
    k = v.shape[-1]
    flat = v.reshape(v.shape[0] if rows else 1, -1).double()
    parts = []
    for s in range(0, bank.shape[0], STACK_CHUNK):
        m = ops.unpack_masks(bank[s:s + STACK_CHUNK], k, torch.float64)
        parts.append(flat @ m.view(m.shape[0], -1).t())
    out = torch.cat(parts, 1)
    return out if rows else out[0]


# ======================================================================================
# numpy pack / unpack
# ======================================================================================
def numpy_pack(masks: torch.Tensor) -> torch.Tensor:
    """Bool ``[..., N, K]`` -> int32 words with ``np.packbits`` (little bit order, rows padded to words)."""
    k = masks.shape[-1]
    pad = (-k) % 32
    a = masks.numpy()
    if pad:
        a = np.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, pad)])
    packed = np.packbits(a, axis=-1, bitorder="little")
    return torch.from_numpy(packed.view("<i4"))


def numpy_unpack(words: torch.Tensor, k: int) -> torch.Tensor:
    bits = np.unpackbits(words.numpy().view(np.uint8), axis=-1, count=k, bitorder="little")
    return torch.from_numpy(bits.view(np.bool_))


# ======================================================================================
# Networks
# ======================================================================================
def plain_net(net: str, device="cpu") -> nn.Sequential:
    """The network as ``nn.Sequential`` of bias-free ``nn.Linear`` layers (what ``convert_`` takes)."""
    layers: list[nn.Module] = [nn.Flatten()]
    spec = NETS[net]
    for i, (n, k) in enumerate(spec):
        layers.append(nn.Linear(k, n, bias=False, device=device))
        if i < len(spec) - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def dense_net(net: str, weights: Sequence[torch.Tensor]) -> nn.Sequential:
    """The plain network with these weights, all trainable (the dense training baseline)."""
    model = plain_net(net, weights[0].device).to(weights[0].dtype)
    with torch.no_grad():
        for lin, w in zip([m for m in model if isinstance(m, nn.Linear)], weights):
            lin.weight.copy_(w)
    return model


class OfficialMaskLinear(nn.Module):
    """One task's learnable scores over a frozen weight, binarised every forward (official style)."""

    def __init__(self, weight: torch.Tensor, scores: torch.Tensor, binariser: str = "threshold",
                 density: float = 0.5):
        super().__init__()
        self.register_buffer("weight", weight.detach().clone())
        self.scores = nn.Parameter(scores.detach().clone())
        self.binariser, self.density = binariser, density

    def forward(self, x):
        if self.binariser == "threshold":
            mask = GetSubnet.apply(self.scores)
        else:
            mask = GetSubnetTopK.apply(self.scores.abs(), self.density)
        return F.linear(x, self.weight * mask)


def official_train_net(weights: Sequence[torch.Tensor], scores: Sequence[torch.Tensor],
                       binariser: str = "threshold", density: float = 0.5) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (w, s) in enumerate(zip(weights, scores)):
        layers.append(OfficialMaskLinear(w, s, binariser, density))
        if i < len(weights) - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def official_one_shot(weights: Sequence[torch.Tensor], stacks: Sequence[torch.Tensor], x: torch.Tensor,
                      num_real: int = NUM_REAL, gemv: bool = False):
    """Official-style one-shot task inference: alpha uniform and requiring grad, the superposed
    forward ``W * (alpha * stack).sum(0)`` in every layer, the G objective, autograd, argmin.

    ``gemv=True`` mixes the stack as ``alpha @ stack.view(T, -1)`` instead (autograd's backward
    is then a GEMV too): the best a float32 stack can do in plain PyTorch.
    """
    t = stacks[0].shape[0]
    alpha = torch.full((t,), 1.0 / t, device=x.device, requires_grad=True)
    h = x.reshape(x.shape[0], -1)
    for i, (w, stack) in enumerate(zip(weights, stacks)):
        mixed = (alpha @ stack.view(t, -1)).view_as(w) if gemv else (alpha[:, None, None] * stack).sum(0)
        h = F.linear(h, w * mixed)
        if i < len(weights) - 1:
            h = F.relu(h)
    (grad,) = torch.autograd.grad(ref.g_objective(h, num_real), alpha)
    return int(grad.argmin()), grad


def exact_alpha_grad(weights: Sequence[torch.Tensor], banks: Sequence[torch.Tensor], x: torch.Tensor,
                     num_real: int = NUM_REAL) -> torch.Tensor:
    """The one-shot alpha-gradient in float64 without a float stack: ``W_eff`` by chunked
    superposition, ``G_l = d obj / d W_eff,l`` by autograd, then ``sum_l <G_l * W_l, M_l,t>``."""
    t = banks[0].shape[0]
    alpha = torch.full((t,), 1.0 / t, dtype=torch.float64, device=x.device)
    effs = [exact_superpose(w, b, alpha).requires_grad_() for w, b in zip(weights, banks)]
    with torch.enable_grad():
        h = x.reshape(x.shape[0], -1).double()
        for i, w_eff in enumerate(effs):
            h = F.linear(h, w_eff)
            if i < len(effs) - 1:
                h = F.relu(h)
        z = torch.cat([h[..., :num_real].detach(), h[..., num_real:]], dim=-1)
        gs = torch.autograd.grad(torch.logsumexp(z, dim=-1).mean(), effs)
    return sum(exact_mask_dots(g * w.double(), b) for g, w, b in zip(gs, weights, banks))


def exact_alpha_grad_rows(weights: Sequence[torch.Tensor], banks: Sequence[torch.Tensor], x: torch.Tensor,
                          num_real: int = NUM_REAL) -> torch.Tensor:
    """Per-example one-shot alpha-gradients ``[B, T]`` in float64: row ``r``'s own G objective's gradient,
    ``sum_l <G_l,r * W_l, M_l,t>`` with ``G_l,r = d obj_r / d W_eff,l``."""
    t = banks[0].shape[0]
    alpha = torch.full((t,), 1.0 / t, dtype=torch.float64, device=x.device)
    effs = [exact_superpose(w, b, alpha).requires_grad_() for w, b in zip(weights, banks)]
    per_layer = [[] for _ in effs]
    with torch.enable_grad():
        for r in range(x.shape[0]):
            h = x[r:r + 1].reshape(1, -1).double()
            for i, w_eff in enumerate(effs):
                h = F.linear(h, w_eff)
                if i < len(effs) - 1:
                    h = F.relu(h)
            z = torch.cat([h[..., :num_real].detach(), h[..., num_real:]], dim=-1)
            for acc, g, w in zip(per_layer, torch.autograd.grad(torch.logsumexp(z, dim=-1).sum(), effs), weights):
                acc.append(g * w.double())
    return sum(exact_mask_dots(torch.stack(v), b, rows=True) for v, b in zip(per_layer, banks))


# ======================================================================================
# Peak memory of a piece of work, measured in a fresh process
# ======================================================================================
def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
        return int(m.group(1)) if m else None
    except OSError:
        return None


def reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_bytes() -> int:
    return (_status_kib("VmRSS") or 0) * 1024


def anon_rss_bytes() -> int:
    """Resident anonymous memory (heap, mmap'd buffers): what the process allocated, without the
    shared libraries' code pages (RssFile), which are paged in once whatever the work is."""
    anon = _status_kib("RssAnon")
    return anon * 1024 if anon is not None else rss_bytes()


def peak_rss_bytes() -> int:
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        return hwm * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
