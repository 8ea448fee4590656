"""Many tasks at once: superpose and mask_dots over a whole network's banks, and pack / unpack.

superpose / mask_dots groups: every layer of LeNet-300-100 or FC-1024-1024, T tasks, float32.
The bank holds random bits (the cost of these ops does not depend on the mask values), alpha is
uniform (the state of one-shot task inference), v is a float32 tensor of each layer's shape (in
task inference, the gradient w.r.t. the effective weight times W) holding small integers, so that
every provider's sums are exact and the correctness check is sharp (the cost does not change). Providers:
  supsup_fast[<backend>]  ops.superpose / ops.mask_dots on the packed bank
  reference               supsup_fast.reference (only for T <= 16 at full size: it is slow)
  official                a float32 [T, N, K] stack: (alpha[:, None, None] * stack).sum(0) * W and,
                          for mask_dots, (v * stack).sum((1, 2)) as autograd computes it
  stack_matvec            the same float32 stack as one GEMV (the strongest float baseline)
  two_pass                unpack 64 tasks at a time to float32, GEMV, accumulate (bounded memory)
extra_info records the bank's bytes and the float32 stack's bytes.

pack / unpack groups: bool masks [T, N, K] <-> int32 words; providers supsup_fast[<backend>],
reference, numpy (np.packbits / np.unpackbits, little bit order).
"""

from __future__ import annotations

import baselines as bl
import torch
from harness import Case, backend_of, fast_backends, require_memory, sf, words_like

from supsup_fast import format as fmt
from supsup_fast import ops
from supsup_fast import reference as ref

REFERENCE_MAX_TASKS = 16  # at full size the reference's per-task loop is timed only up to here


# ======================================================================================
# superpose and mask_dots
# ======================================================================================
def _grid(size: str):
    if size == "tiny":
        return [("lenet", 1), ("lenet", 3), ("fc1024", 2)]
    return [(net, t) for net in ("lenet", "fc1024") for t in (1, 16, 250, 2500)]


def _bank_build(net: str, t: int, device: str):
    def build():
        layers = []
        for i, (n, k) in enumerate(bl.NETS[net]):
            layers.append({
                "w": ref.signed_constant(0, i, (n, k)).to(device),
                "bank": words_like((t, n, fmt.words_per_row(k)), k, device),
                # small integers: every provider's sums are exact in float32, so the check is sharp
                "v": torch.randint(-8, 9, (n, k), device=device).float(),
            })
        return {"layers": layers, "alpha": torch.full((t,), 1.0 / t, device=device)}

    return build


def _bank_cases(family: str, size: str, device: str):
    op = family
    for net, t in _grid(size):
        nk = [n * k for n, k in bl.NETS[net]]
        bank_bytes = sum(fmt.packed_nbytes((n, k), t) for n, k in bl.NETS[net])
        per_layer = 8 if family == "superpose" else 4  # superpose: read W, write W_eff; mask_dots: read v
        case = Case(
            family=family, id=f"{net}-T{t}",
            params={"net": net, "T": t, "dtype": "float32", "bank_bytes": bank_bytes,
                    "stack_bytes": bl.stack_bytes(net, t),
                    "bank_bytes_per_task": bank_bytes // t, "stack_bytes_per_task": bl.stack_bytes(net, 1)},
            build=_bank_build(net, t, device),
            bytes=sum(t * p / 8 + per_layer * p for p in nk),
        )
        providers = [sf(b) for b in fast_backends(op, device)]
        if size == "tiny" or t <= REFERENCE_MAX_TASKS:
            providers.append("reference")
        providers += ["official", "stack_matvec", "two_pass"]
        for p in providers:
            yield case, p


def params_superpose(size, device):
    return _bank_cases("superpose", size, device)


def params_mask_dots(size, device):
    return _bank_cases("mask_dots", size, device)


def _stacks(d: dict, case: Case, device: str, temp_copies: int) -> list[torch.Tensor]:
    """The float32 stacks of every layer, built once per group, after checking they fit."""
    need = case.params["stack_bytes"] * temp_copies
    if "stacks" not in d:
        need += case.params["stack_bytes"]
    what = f"the float32 [T, N, K] stacks of {case.params['net']} at T={case.params['T']}"
    require_memory(need, device, what + (" plus a product of the same size" if temp_copies else ""))
    if "stacks" not in d:
        d["stacks"] = [bl.float_stack(layer["bank"], layer["w"].shape[1]) for layer in d["layers"]]
    return d["stacks"]


def _small(case: Case) -> bool:
    return case.params["T"] <= REFERENCE_MAX_TASKS


def test_superpose(benchmark, runner, device, case, provider):
    d = runner.inputs(case)
    layers, alpha = d["layers"], d["alpha"]
    backend = backend_of(provider)
    if backend:
        fn = lambda: [ops.superpose(l["w"], l["bank"], alpha) for l in layers]  # noqa: E731,E741
    elif provider == "reference":
        fn = lambda: [ref.superpose(l["w"], l["bank"], alpha) for l in layers]  # noqa: E731,E741
    elif provider == "official":
        stacks = _stacks(d, case, device, temp_copies=1)
        fn = lambda: [bl.official_superpose(l["w"], s, alpha) for l, s in zip(layers, stacks)]  # noqa: E731,E741
    elif provider == "stack_matvec":
        stacks = _stacks(d, case, device, temp_copies=0)
        fn = lambda: [bl.matvec_superpose(l["w"], s, alpha) for l, s in zip(layers, stacks)]  # noqa: E731,E741
    else:
        fn = lambda: [bl.two_pass_superpose(l["w"], l["bank"], alpha) for l in layers]  # noqa: E731,E741

    def expected():
        if _small(case):
            return [ref.superpose(l["w"].double(), l["bank"], alpha.double()) for l in layers]  # noqa: E741
        return [bl.exact_superpose(l["w"], l["bank"], alpha) for l in layers]  # noqa: E741

    with torch.no_grad():
        runner.run(benchmark, case, provider, fn, expected=expected,
                   context=ops.force_backend(backend) if backend else None)


def test_mask_dots(benchmark, runner, device, case, provider):
    d = runner.inputs(case)
    layers = d["layers"]
    backend = backend_of(provider)
    if backend:
        fn = lambda: [ops.mask_dots(l["v"], l["bank"]) for l in layers]  # noqa: E731,E741
    elif provider == "reference":
        fn = lambda: [ref.mask_dots(l["v"], l["bank"]) for l in layers]  # noqa: E731,E741
    elif provider == "official":
        stacks = _stacks(d, case, device, temp_copies=1)
        fn = lambda: [bl.official_mask_dots(l["v"], s) for l, s in zip(layers, stacks)]  # noqa: E731,E741
    elif provider == "stack_matvec":
        stacks = _stacks(d, case, device, temp_copies=0)
        fn = lambda: [bl.matvec_mask_dots(l["v"], s) for l, s in zip(layers, stacks)]  # noqa: E731,E741
    else:
        fn = lambda: [bl.two_pass_mask_dots(l["v"], l["bank"]) for l in layers]  # noqa: E731,E741

    def expected():
        if _small(case):
            return [ref.mask_dots(l["v"].double(), l["bank"]) for l in layers]  # noqa: E741
        return [bl.exact_mask_dots(l["v"], l["bank"]) for l in layers]  # noqa: E741

    with torch.no_grad():
        runner.run(benchmark, case, provider, fn, expected=expected,
                   context=ops.force_backend(backend) if backend else None)


# ======================================================================================
# pack / unpack
# ======================================================================================
def _pack_cases(family: str, size: str, device: str):
    shapes = [(2, 37, 70), (1, 300, 784)] if size == "tiny" else [(1, 300, 784), (1, 1024, 1024), (16, 1024, 1024)]
    for t, n, k in shapes:
        def build(t=t, n=n, k=k):
            masks = torch.rand(t, n, k, device=device) < 0.5
            return {"masks": masks, "words": ref.pack_masks(masks), "k": k}

        case = Case(family=family, id=f"T{t}-{n}x{k}", params={"T": t, "N": n, "K": k},
                    build=build, bytes=t * n * k * (1 + 1 / 8))
        providers = [sf(b) for b in fast_backends(family, device, None)] + ["reference"]
        if device == "cpu":
            providers.append("numpy")
        for p in providers:
            yield case, p


def params_pack(size, device):
    return _pack_cases("pack_masks", size, device)


def params_unpack(size, device):
    return _pack_cases("unpack_masks", size, device)


def test_pack(benchmark, runner, case, provider):
    d = runner.inputs(case)
    masks = d["masks"]
    backend = backend_of(provider)
    fn = {
        "reference": lambda: ref.pack_masks(masks),
        "numpy": lambda: bl.numpy_pack(masks),
    }.get(provider, lambda: ops.pack_masks(masks))
    runner.run(benchmark, case, provider, fn, expected=lambda: d["words"],
               context=ops.force_backend(backend) if backend else None)


def test_unpack(benchmark, runner, case, provider):
    d = runner.inputs(case)
    words, k = d["words"], d["k"]
    backend = backend_of(provider)
    fn = {
        "reference": lambda: ref.unpack_masks(words, k),
        "numpy": lambda: bl.numpy_unpack(words, k),
    }.get(provider, lambda: ops.unpack_masks(words, k))
    runner.run(benchmark, case, provider, fn, expected=lambda: d["masks"],
               context=ops.force_backend(backend) if backend else None)


def test_bytes_per_task():
    """The bank stores exactly one bit per weight per task plus row padding; a float stack 32."""
    for net, layers in bl.NETS.items():
        bits = sum(fmt.packed_nbytes((n, k)) * 8 for n, k in layers)
        padding = sum(n * (fmt.words_per_row(k) * 32 - k) for n, k in layers)
        assert bits == bl.net_params(net) + padding
        assert bl.stack_bytes(net, 1) == 4 * bl.net_params(net)
        assert padding < 32 * sum(n for n, _ in layers)
