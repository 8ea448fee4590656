"""Shared test code for ``tests/``, ``bench/`` and anyone adding a backend: errors, tolerances,
random inputs, the available backends, and one case table per dispatched op.

The tolerance rule (one table, per dtype)
-----------------------------------------
A result ``out`` computed in ``dtype`` is compared with ``exact``, the reference backend evaluated in
float64 on the *same* (already rounded) inputs, by its normwise relative error
``||out - exact|| / ||exact||`` (:func:`rel_error`). It must not exceed :data:`TOLERANCE` ``[dtype]``:

==========  ==========  =================================================================
dtype       tolerance   why
==========  ==========  =================================================================
float64     1e-12       accumulation in float64
float32     2e-5        accumulation in float32: sums of up to ~1e4 terms (~170 eps(fp32))
tf32        2e-3        float32 inputs whose products run in TF32 (GPU dots): 2 eps(tf32)
float16     2e-3        the output's own rounding (2 eps(fp16)); accumulation in float32
bfloat16    1.6e-2      the output's own rounding (2 eps(bf16)); accumulation in float32
==========  ==========  =================================================================

A result that sums more than ``1e4`` products (a task-inference alpha-gradient sums ``<v, M_t>`` over
whole layers) gets the float32 / float64 / tf32 tolerance times ``sqrt(terms / 1e4)``: the rounding
errors of a long sum add like a random walk (:func:`tolerance` with ``terms``). The 16-bit tolerances
are set by the output's own rounding and do not grow.

``eps`` is the machine epsilon (:data:`EPS`, the spacing of floats at 1). Elementwise checks (the
fuzzers) use the same epsilons: ``|out - exact| <= (4 eps(dtype) + terms * eps(accumulator)) *
sum |terms|`` (:func:`summation_bound`), a bound on the rounding of any summation order.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from . import ops

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
EPS = {torch.float64: 2.0**-52, torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
TF32_TOLERANCE = 2e-3


SUM_TERMS = 10_000  # the longest sum the table's float32 / float64 tolerances cover


def tolerance(dtype: torch.dtype, tf32: bool = False, terms: Optional[int] = None) -> float:
    """The allowed normwise relative error of a ``dtype`` result that sums ``terms`` products (default:
    at most :data:`SUM_TERMS`; see the module docstring)."""
    base = TF32_TOLERANCE if tf32 and dtype == torch.float32 else TOLERANCE[dtype]
    if terms is not None and terms > SUM_TERMS and dtype in (torch.float32, torch.float64):
        base *= math.sqrt(terms / SUM_TERMS)
    return base


def accumulator(dtype: torch.dtype) -> torch.dtype:
    """The dtype kernels accumulate ``dtype`` products in: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def summation_bound(dtype: torch.dtype, terms: int) -> float:
    """Relative elementwise bound for a sum of ``terms`` products computed in ``dtype``."""
    return 4 * EPS[dtype] + terms * EPS[accumulator(dtype)]


def rel_error(out: torch.Tensor, exact: torch.Tensor) -> float:
    """``||out - exact|| / ||exact||`` in float64 (``||out||`` when ``exact`` is all zeros)."""
    o, e = out.detach().double().cpu(), exact.detach().double().cpu()
    denom = e.norm().item()
    return (o - e).norm().item() / (denom if denom > 0 else 1.0)


def assert_rel_close(out: torch.Tensor, exact: torch.Tensor, dtype: Optional[torch.dtype] = None, *,
                     tol: Optional[float] = None, tf32: bool = False, what: str = "") -> None:
    """``out`` has ``exact``'s shape, ``dtype`` (default ``out``'s), finite values, and a normwise relative
    error within the tolerance of :data:`TOLERANCE`."""
    dtype = out.dtype if dtype is None else dtype
    label = f"{what}: " if what else ""
    assert out.dtype == dtype, f"{label}dtype {out.dtype}, expected {dtype}"
    assert tuple(out.shape) == tuple(exact.shape), f"{label}shape {tuple(out.shape)}, expected {tuple(exact.shape)}"
    assert bool(torch.isfinite(out.detach().double()).all()), f"{label}non-finite values"
    limit = tolerance(dtype, tf32) if tol is None else tol
    err = rel_error(out, exact)
    assert err <= limit, f"{label}relative error {err:.3g} > {limit:.3g} for {dtype}"


# ======================================================================================
# Random inputs (seeded: every test and benchmark is reproducible)
# ======================================================================================
@contextlib.contextmanager
def torch_threads(n: int):
    """Run the body with ``n`` torch CPU threads, then restore the count. Tests of tiny tensors use one: it is
    the fastest there and immune to a busy 2-core machine."""
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def randn(shape: Sequence[int], dtype: torch.dtype = torch.float32, seed: int = 0, device="cpu") -> torch.Tensor:
    """Standard normal values drawn in float64 on the CPU, then rounded to ``dtype``."""
    return torch.randn(tuple(shape), generator=generator(seed), dtype=torch.float64).to(device=device, dtype=dtype)


def random_masks(shape: Sequence[int], seed: int = 0, density: float = 0.5, device="cpu") -> torch.Tensor:
    """Bool masks keeping each weight with probability ``density``."""
    return (torch.rand(tuple(shape), generator=generator(seed)) < density).to(device)


def random_bank(tasks: int, n: int, k: int, seed: int = 0, density: float = 0.5, device="cpu") -> torch.Tensor:
    """Packed words ``[tasks, n, ceil(k/32)]`` of random masks (packed by the reference, independent of the
    backend under test)."""
    from .backends import reference

    return reference.pack_masks(random_masks((tasks, n, k), seed, density)).to(device)


# ======================================================================================
# Backends
# ======================================================================================
def available_backends(op: Optional[str] = None) -> list[tuple[str, str]]:
    """``(backend, device)`` pairs this machine can run (for ``op``, if given): every available backend on
    every device it serves that exists here."""
    present = {"cpu"} | ({"cuda"} if torch.cuda.is_available() else set())
    pairs = []
    for b in ops.backends():
        if not b.available or (op is not None and op not in b.impls):
            continue
        pairs += [(b.name, d) for d in b.devices if d in present]
    return pairs


# ======================================================================================
# One case table per dispatched op
# ======================================================================================
@dataclass(frozen=True)
class OpCase:
    """One input of one op: ``make(dtype, device, seed)`` builds the op's arguments.

    ``dtypes`` are the float dtypes it is run in (``None``: a bit op, whose output is exact).
    """

    op: str
    name: str
    make: Callable[[Optional[torch.dtype], str, int], tuple]
    dtypes: Optional[tuple] = FLOAT_DTYPES

    @property
    def id(self) -> str:
        return f"{self.op}[{self.name}]"


def _lin(m, n, k, bias):
    def make(dtype, device, seed):
        b = randn((n,), dtype, seed + 3, device) if bias else None
        return randn((*m, k), dtype, seed, device), randn((n, k), dtype, seed + 1, device), \
            random_bank(1, n, k, seed + 2, device=device)[0], b
    return make


def _cases() -> list[OpCase]:
    c: list[OpCase] = []
    for k in (1, 31, 33, 100):
        c.append(OpCase("pack_masks", f"k{k}", lambda d, dev, s, k=k: (random_masks((2, 5, k), s, 0.4, dev),), None))
        c.append(OpCase("unpack_masks", f"k{k}", lambda d, dev, s, k=k: (random_bank(2, 5, k, s, 0.4, dev), k,
                                                                      torch.float32), None))
    for shape in ((7, 1), (5, 33), (3, 4, 3, 3)):
        def am(dtype, device, seed, shape=shape):
            return randn(shape, dtype, seed, device), random_bank(1, shape[0], math.prod(shape[1:]), seed + 1,
                                                                   device=device)[0]
        c.append(OpCase("apply_mask", "x".join(map(str, shape)), am))
    for m, n, k, bias in (((1,), 7, 1, False), ((3,), 5, 31, True), ((2, 3), 9, 33, False), ((17,), 6, 64, True),
                          ((1,), 12, 784, False)):
        name = f"M{'x'.join(map(str, m))}-N{n}-K{k}" + ("-bias" if bias else "")
        c.append(OpCase("masked_linear", name, _lin(m, n, k, bias)))

        def gi(dtype, device, seed, m=m, n=n, k=k):
            return randn((*m, n), dtype, seed, device), randn((n, k), dtype, seed + 1, device), \
                random_bank(1, n, k, seed + 2, device=device)[0]
        c.append(OpCase("masked_linear_grad_input", name, gi))

        def wg(dtype, device, seed, m=m, n=n, k=k):
            return randn((*m, n), dtype, seed, device), randn((*m, k), dtype, seed + 1, device), \
                randn((n, k), dtype, seed + 2, device)
        c.append(OpCase("masked_weight_grad", name, wg))
        c.append(OpCase("masked_weight_grad_sign", name,
                        lambda d, dev, s, wg=wg, n=n, k=k: (*wg(d, dev, s), randn((n, k), d, s + 3, dev))))
        c.append(OpCase("masked_linear_seeded", name,
                        lambda d, dev, s, m=m, n=n, k=k, bias=bias: (
                            randn((*m, k), d, s, dev), random_bank(1, n, k, s + 1, device=dev)[0], 1234 + s, 7, 0.37,
                            randn((n,), d, s + 2, dev) if bias else None)))
    for cin, cout, kk, stride, pad, dil, groups in ((4, 6, 3, (1, 1), (1, 1), (1, 1), 1),
                                                    (6, 8, 3, (2, 1), (1, 0), (1, 2), 2)):
        def conv(dtype, device, seed, cin=cin, cout=cout, kk=kk, stride=stride, pad=pad, dil=dil, groups=groups):
            w = randn((cout, cin // groups, kk, kk), dtype, seed + 1, device)
            return (randn((2, cin, 9, 9), dtype, seed, device), w,
                    random_bank(1, cout, w[0].numel(), seed + 2, device=device)[0],
                    randn((cout,), dtype, seed + 3, device),
                    list(stride), list(pad), list(dil), groups)
        c.append(OpCase("masked_conv2d", f"c{cin}-{cout}-g{groups}", conv))
    for t, n, k in ((1, 5, 33), (6, 11, 100), (40, 3, 70)):
        def sp(dtype, device, seed, t=t, n=n, k=k):
            alpha = torch.rand(t, generator=generator(seed + 2)).to(device)
            alpha[::3] = 0  # skipped tasks
            return randn((n, k), dtype, seed, device), random_bank(t, n, k, seed + 1, device=device), alpha
        c.append(OpCase("superpose", f"T{t}-N{n}-K{k}", sp))
        c.append(OpCase("mask_dots", f"T{t}-N{n}-K{k}",
                        lambda d, dev, s, t=t, n=n, k=k: (randn((3, n, k), d, s, dev), random_bank(t, n, k, s + 1,
                                                                                                   device=dev))))
        c.append(OpCase("masked_linear_grouped", f"T{t}-N{n}-K{k}",
                        lambda d, dev, s, t=t, n=n, k=k: (
                            randn((9, k), d, s, dev), randn((n, k), d, s + 1, dev),
                            random_bank(t, n, k, s + 2, device=dev),
                            torch.randint(0, t, (9,), generator=generator(s + 3)).to(dev), randn((n,), d, s + 4, dev))))
        c.append(OpCase("masked_linear_grouped_grad_input", f"T{t}-N{n}-K{k}",
                        lambda d, dev, s, t=t, n=n, k=k: (
                            randn((9, n), d, s, dev), randn((n, k), d, s + 1, dev),
                            random_bank(t, n, k, s + 2, device=dev),
                            torch.randint(0, t, (9,), generator=generator(s + 3)).to(dev))))
    for shape in ((4, 6), (3, 5, 5)):  # a seed with its top bit set: the hash reads all 32 bits (seeds are < 2**32)
        c.append(OpCase("signed_constant_fill_", "x".join(map(str, shape)),
                        lambda d, dev, s, shape=shape: (torch.empty(shape, dtype=d, device=dev), 2**32 - 1 - s, 4,
                                                        0.3)))
    for shape in ((4, 6), (3, 5, 5), (5, 70)):  # the ternary kernels' seed formats, both
        for v in (1, 2):
            c.append(OpCase("seeded_fill_", "x".join(map(str, shape)) + f"-v{v}",
                            lambda d, dev, s, shape=shape, v=v: (torch.empty(shape, dtype=d, device=dev), 2**32 - 1 - s,
                                                                 4, 0.3, v)))
    for m, n, k, bias in (((1,), 7, 1, False), ((3,), 21, 31, True), ((2, 3), 9, 33, False), ((17,), 40, 100, True),
                          ((1,), 12, 784, False)):
        for v in (1, 2):
            name = f"M{'x'.join(map(str, m))}-N{n}-K{k}" + ("-bias" if bias else "") + f"-v{v}"
            c.append(OpCase("ternary_linear", name,
                            lambda d, dev, s, m=m, n=n, k=k, bias=bias, v=v: (
                                randn((*m, k), d, s, dev), random_bank(1, n, k, s + 1, device=dev)[0], 4321 + s, 9,
                                0.37, randn((n,), d, s + 2, dev) if bias else None, v)))
            c.append(OpCase("ternary_linear_grad_input", name,
                            lambda d, dev, s, m=m, n=n, k=k, v=v: (
                                randn((*m, n), d, s, dev), random_bank(1, n, k, s + 1, device=dev)[0], k, 4321 + s, 9,
                                0.37, v)))
    for n, k, keep in ((7, 13, 30), (64, 100, 3200), (3, 70_001, 1)):
        def scores(dtype, device, seed, n=n, k=k):
            s = randn((n, k), torch.float32, seed, device)
            s.view(-1)[:: max(1, n * k // 17)] = 0.0  # ties
            return s.to(dtype)
        c.append(OpCase("largest_k", f"{n * k}-k{keep}",
                        lambda d, dev, s, scores=scores, keep=keep: (scores(d, dev, s).reshape(-1), keep, True)))
        c.append(OpCase("topk_words", f"{n}x{k}-k{keep}", lambda d, dev, s, scores=scores, keep=keep: (
            scores(d, dev, s), keep)))
        c.append(OpCase("threshold_words", f"{n}x{k}", lambda d, dev, s, scores=scores: (scores(d, dev, s),)))
    return c


#: every case of every dispatched op
OP_CASES: list[OpCase] = _cases()


def cases_of(op: str) -> list[OpCase]:
    return [c for c in OP_CASES if c.op == op]


def upcast(args: tuple) -> tuple:
    """Floating tensors to float64 (the exact evaluation's inputs); everything else as is."""
    return tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def run_case(case: OpCase, backend: str, device: str, dtype: Optional[torch.dtype], seed: int = 0):
    """``(out, exact)``: the backend's kernel on the case's inputs, and the reference on the CPU on the same
    inputs in float64 (in-place ops and bit ops: in their own dtype). In-place ops give their first argument."""
    args = case.make(dtype, device, seed)
    in_place = case.op.endswith("_")
    ref_args = tuple(a.detach().cpu().clone() if isinstance(a, torch.Tensor) else a for a in args)
    if dtype is not None and not in_place:
        ref_args = upcast(ref_args)
    out = ops.get_backend(backend).impls[case.op](*args)
    exact = ops.get_backend("reference").impls[case.op](*ref_args)
    return (args[0], ref_args[0]) if in_place else (out, exact)
