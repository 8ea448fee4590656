"""One masked layer, one task: masked_linear and masked_conv2d, forward and backward.

Groups (one per shape, batch and dtype), providers:
  supsup_fast[<backend>]  ops.masked_linear / ops.masked_conv2d with that backend forced
  reference               supsup_fast.reference (the executable spec)
  official                a stored float32 mask: layer(x, W * M)
  two_pass                the packed mask materialised first: layer(x, ops.apply_mask(W, words))
  dense                   layer(x, W) with no mask: the cost floor

Backward ("_bwd" families) times forward + backward together. masked_linear_bwd is the
supermask training step of a layer: gradients to the input and, straight through the mask, to
the scores. masked_conv2d_bwd: gradients to the input and the weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from baselines import NETS, StraightThrough
from harness import Case, backend_of, fast_backends, sf

from supsup_fast import ops
from supsup_fast import reference as ref

BASELINES = ["reference", "official", "two_pass", "dense"]
DTYPE_SIZE = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


def _dtypes(device: str) -> list[torch.dtype]:
    return [torch.bfloat16] if device == "cuda" else [torch.float32]


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ======================================================================================
# masked_linear
# ======================================================================================
def _linear_shapes(size: str, device: str, backward: bool):
    if size == "tiny":
        return [("lenet.fc1", 300, 784), ("odd", 37, 70)], [1, 5]
    named = {f"{net}.fc{i + 1}": nk for net, layers in NETS.items() for i, nk in enumerate(layers)}
    shapes = [(name, n, k) for name, (n, k) in named.items() if name != "fc1024.fc3"]
    batches = [1, 128] if backward else [1, 16, 128]
    if device == "cuda":
        shapes.append(("big", 4096, 4096))
        batches = [1, 16, 128, 1024, 8192]
    return shapes, batches


def _linear_build(n: int, k: int, m: int, dtype: torch.dtype, device: str):
    def build():
        w = ref.signed_constant(0, 1, (n, k), dtype=torch.float32).to(device, dtype)
        scores = torch.randn(n, k, device=device, dtype=dtype)
        mask = scores >= 0
        return {
            "x": torch.randn(m, k, device=device, dtype=dtype),
            "w": w,
            "scores": scores,
            "words": ops.pack_masks(mask),
            "mask_f": mask.to(dtype),
            "g": torch.randn(m, n, device=device, dtype=dtype),
        }

    return build


def _linear_cases(family: str, size: str, device: str, backward: bool):
    shapes, batches = _linear_shapes(size, device, backward)
    op = "masked_linear"
    for dtype in _dtypes(device):
        s = DTYPE_SIZE[dtype]
        for name, n, k in shapes:
            for m in batches:
                if name == "big" and device != "cuda":
                    continue
                case = Case(
                    family=family, id=f"{name}-M{m}-{_name(dtype)}",
                    params={"layer": name, "N": n, "K": k, "M": m, "dtype": _name(dtype)},
                    build=_linear_build(n, k, m, dtype, device),
                    bytes=None if backward else s * (m * k + m * n) + (s + 1 / 8) * n * k,
                    flops=(6 if backward else 2) * m * n * k,
                )
                for p in [sf(b) for b in fast_backends(op, device, dtype)] + BASELINES:
                    yield case, p


def params_masked_linear_fwd(size, device):
    return _linear_cases("masked_linear_fwd", size, device, backward=False)


def params_masked_linear_bwd(size, device):
    return _linear_cases("masked_linear_bwd", size, device, backward=True)


def test_masked_linear_fwd(benchmark, runner, case, provider):
    d = runner.inputs(case)
    x, w, words, mask_f = d["x"], d["w"], d["words"], d["mask_f"]
    fns = {
        "reference": lambda: ref.masked_linear(x, w, words),
        "official": lambda: F.linear(x, w * mask_f),
        "two_pass": lambda: F.linear(x, ops.apply_mask(w, words)),
        "dense": lambda: F.linear(x, w),
    }
    backend = backend_of(provider)
    fn = (lambda: ops.masked_linear(x, w, words)) if backend else fns[provider]
    if provider == "dense":
        key, expected = "dense", lambda: F.linear(x.double(), w.double())
    else:
        key, expected = "masked", lambda: F.linear(x.double(), w.double() * mask_f.double())
    with torch.no_grad():
        runner.run(benchmark, case, provider, fn, expected=expected, expected_key=key,
                   context=ops.force_backend(backend) if backend else None)


def test_masked_linear_bwd(benchmark, runner, case, provider):
    d = runner.inputs(case)
    x, w, words, mask_f, g = d["x"], d["w"], d["words"], d["mask_f"], d["g"]
    xr = x.clone().requires_grad_()
    sr = d["scores"].clone().requires_grad_()
    wr = w.clone().requires_grad_()

    def grads(y, wrt):
        return (y, *torch.autograd.grad(y, wrt, g))

    def reference():
        return (ref.masked_linear(x, w, words), ref.masked_linear_grad_input(g, w, words),
                ref.masked_weight_grad(g, x, w))

    fns = {
        "reference": reference,
        "official": lambda: grads(F.linear(xr, w * StraightThrough.apply(sr, mask_f)), (xr, sr)),
        "two_pass": lambda: grads(F.linear(xr, ops.apply_mask(w, words, scores=sr)), (xr, sr)),
        "dense": lambda: grads(F.linear(xr, wr), (xr, wr)),
    }
    backend = backend_of(provider)
    if backend:
        fn = lambda: grads(ops.masked_linear(xr, w, words, scores=sr), (xr, sr))  # noqa: E731
    else:
        fn = fns[provider]

    def expected():
        x64, w64, g64 = x.double(), w.double(), g.double()
        weff = w64 if provider == "dense" else w64 * mask_f.double()
        gw = g64.t() @ x64
        return x64 @ weff.t(), g64 @ weff, gw if provider == "dense" else gw * w64

    runner.run(benchmark, case, provider, fn, expected=expected,
               expected_key="dense" if provider == "dense" else "masked",
               context=ops.force_backend(backend) if backend else None, graph=False)


# ======================================================================================
# masked_conv2d (reduced ResNet-18, width 20: 3x3 convs, stride 1, padding 1)
# ======================================================================================
def _conv_cases(family: str, size: str, device: str):
    if size == "tiny":
        shapes, batch = [(4, 8), (20, 6)], 2
    else:
        shapes, batch = [(20, 32), (40, 16), (80, 8), (160, 4)], 32
    for dtype in _dtypes(device):
        s = DTYPE_SIZE[dtype]
        for c, hw in shapes:
            k = c * 9

            def build(c=c, hw=hw, k=k, dtype=dtype):
                w = ref.signed_constant(0, 2, (c, c, 3, 3), dtype=torch.float32).to(device, dtype)
                mask = torch.rand(c, c, 3, 3, device=device) < 0.5
                return {
                    "x": torch.randn(batch, c, hw, hw, device=device, dtype=dtype),
                    "w": w,
                    "words": ops.pack_masks(mask.reshape(c, k)),
                    "mask_f": mask.to(dtype),
                    "g": torch.randn(batch, c, hw, hw, device=device, dtype=dtype),
                }

            case = Case(
                family=family, id=f"c{c}-{hw}x{hw}-B{batch}-{_name(dtype)}",
                params={"channels": c, "hw": hw, "B": batch, "dtype": _name(dtype)},
                build=build,
                bytes=None if family.endswith("bwd") else s * 2 * batch * c * hw * hw + (s + 1 / 8) * c * k,
                flops=(6 if family.endswith("bwd") else 2) * batch * c * hw * hw * k,
            )
            for p in [sf(b) for b in fast_backends("masked_conv2d", device, dtype)] + BASELINES:
                yield case, p


def params_masked_conv2d_fwd(size, device):
    return _conv_cases("masked_conv2d_fwd", size, device)


def params_masked_conv2d_bwd(size, device):
    return _conv_cases("masked_conv2d_bwd", size, device)


def _conv_fns(x, w, words, mask_f):
    return {
        "reference": lambda: ref.masked_conv2d(x, w, words, None, (1, 1), (1, 1), (1, 1), 1),
        "official": lambda: F.conv2d(x, w * mask_f, padding=1),
        "two_pass": lambda: F.conv2d(x, ops.apply_mask(w, words), padding=1),
        "dense": lambda: F.conv2d(x, w, padding=1),
        "supsup_fast": lambda: ops.masked_conv2d(x, w, words, padding=1),
    }


def test_masked_conv2d_fwd(benchmark, runner, case, provider):
    d = runner.inputs(case)
    x, w, words, mask_f = d["x"], d["w"], d["words"], d["mask_f"]
    backend = backend_of(provider)
    fn = _conv_fns(x, w, words, mask_f)["supsup_fast" if backend else provider]
    dense = provider == "dense"
    expected = lambda: F.conv2d(x.double(), w.double() * (1.0 if dense else mask_f.double()), padding=1)  # noqa: E731
    with torch.no_grad():
        runner.run(benchmark, case, provider, fn, expected=expected, expected_key="dense" if dense else "masked",
                   context=ops.force_backend(backend) if backend else None)


def test_masked_conv2d_bwd(benchmark, runner, case, provider):
    d = runner.inputs(case)
    x, w, words, mask_f, g = d["x"], d["w"], d["words"], d["mask_f"], d["g"]
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    backend = backend_of(provider)
    forward = _conv_fns(xr, wr, words, mask_f)["supsup_fast" if backend else provider]

    def fn():
        y = forward()
        return (y, *torch.autograd.grad(y, (xr, wr), g))

    dense = provider == "dense"

    def expected():
        with torch.enable_grad():
            x64 = x.double().requires_grad_()
            w64 = w.double().requires_grad_()
            y = F.conv2d(x64, w64 * (1.0 if dense else mask_f.double()), padding=1)
            return (y.detach(), *torch.autograd.grad(y, (x64, w64), g.double()))

    runner.run(benchmark, case, provider, fn, expected=expected, expected_key="dense" if dense else "masked",
               context=ops.force_backend(backend) if backend else None, graph=False)
