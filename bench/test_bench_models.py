"""Whole models: one-shot task inference from one image, and one training step of a task.

task_inference groups (LeNet-300-100 or FC-1024-1024 with 100 outputs, T tasks): latency of
one-shot task inference from a single image with the G objective (10 real classes).
  supsup_fast[<backend>]  ``infer_task(model, x, method="one_shot", objective="g", num_real=10)``
                          on a model converted with ``convert_`` whose banks hold T masks
  official                a float32 [T, N, K] stack per layer, alpha uniform and requiring grad,
                          forward with ``W * (alpha[:, None, None] * stack).sum(0)``, backward, argmin
  stack_matvec            the same stacks mixed as ``alpha @ stack.view(T, -1)`` (GEMV both ways)
The masks are random bits: task inference costs the same whatever the masks are. Every provider's
alpha-gradient is checked against a float64 computation that never builds a stack.

Memory (extra_info of the task_inference groups): ``bank_bytes`` / ``stack_bytes`` (persistent
state: the packed bank vs the float32 stacks) and ``peak_bytes``, the peak memory of task
inference including that state. CPU: measured in a fresh process as the anonymous resident
memory (RssAnon) gained from before the masks were created to after a warm-up inference (the
masks' state, buffers the kernels keep), plus the kernel's resident high-water mark (VmHWM,
reset through /proc/self/clear_refs just before the measured call) above the resident set at
that reset (every temporary of the inference). torch's CPU allocations are invisible to
tracemalloc; RSS sees everything. Code pages of the shared libraries (RssFile: ~10 MB of
libtorch and the extension paged in by the first inference, the same for any T) are left out;
``rss_state_bytes`` keeps the total for reference. CUDA: the caching allocator's peak during
the call above what was allocated before it, plus the provider's own state.

train_step groups: one optimisation step (forward, cross-entropy, backward, RMSprop lr 1e-4) at
batch 128 of one task's scores of a converted model (``convert_``, ``begin_task``,
``task_parameters``), vs the official-style network (float scores binarised by ``GetSubnet`` every
forward) and the same network trained dense (all weights, no mask). Binarisers: ``threshold``
(M = S >= 0, the GN MNIST setting) and ``topk`` (edge-popup, density 0.5). The first step of each
provider is checked against a float64 official-style step from the same scores.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import baselines as bl
import pytest
import torch
import torch.nn.functional as F
from harness import Case, backend_of, fast_backends, require_memory, sf, tolerance, words_like

from supsup_fast import format as fmt
from supsup_fast import ops

convert = pytest.importorskip("supsup_fast.convert", reason="supsup_fast.convert (convert_) is not available")
inference = pytest.importorskip("supsup_fast.inference", reason="supsup_fast.inference (infer_task) is not available")
from supsup_fast.config import SupsupConfig  # noqa: E402
from supsup_fast.nn import MaskedLinear  # noqa: E402

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))


# ======================================================================================
# Models
# ======================================================================================
def converted_model(net: str, num_tasks: int, device: str, binariser: str = "threshold"):
    """A converted network whose banks hold ``num_tasks`` random masks; and its masked layers."""
    model = bl.plain_net(net, device)
    convert.convert_(model, SupsupConfig(binariser=binariser, density=0.5, seed=0))
    layers = [m for m in model.modules() if isinstance(m, MaskedLinear)]
    for layer in layers:
        n, k = layer.gemm_shape
        if num_tasks:
            layer.bank = words_like((num_tasks, n, fmt.words_per_row(k)), k, device)
    return model.eval(), layers


def one_image(device: str) -> torch.Tensor:
    return torch.rand(1, 1, 28, 28, device=device)


def infer(model, x):
    return inference.infer_task(model, x, method="one_shot", objective="g", num_real=bl.NUM_REAL)


# ======================================================================================
# Task inference latency
# ======================================================================================
def _ti_grid(size: str):
    if size == "tiny":
        return [("lenet", 2), ("lenet", 5), ("fc1024", 3)]
    return [(net, t) for net in ("lenet", "fc1024") for t in (10, 250, 2500)]


def params_task_inference(size, device):
    for net, t in _ti_grid(size):
        def build(net=net, t=t):
            model, layers = converted_model(net, t, device)
            return {"model": model, "weights": [layer.weight for layer in layers],
                    "banks": [layer.bank for layer in layers], "x": one_image(device)}

        bank_bytes = sum(fmt.packed_nbytes((n, k), t) for n, k in bl.NETS[net])
        nk = sum(n * k for n, k in bl.NETS[net])
        # floor: the bank read twice (the forward's W * sum_t alpha_t M_t, the backward's <G * W, M_t>) with the
        # float32 weights, over the copy bandwidth measured in the same run
        case = Case(family="task_inference", id=f"{net}-T{t}",
                    params={"net": net, "T": t, "dtype": "float32", "bank_bytes": bank_bytes,
                            "stack_bytes": bl.stack_bytes(net, t), "bank_passes": 2},
                    build=build, bytes=2 * bank_bytes + 2 * 4 * nk)
        providers = [sf(b) for b in fast_backends("mask_dots", device)] + ["official", "stack_matvec"]
        for p in providers:
            yield case, p


def _stacks(d: dict, case: Case, device: str, copies: float) -> list[torch.Tensor]:
    need = case.params["stack_bytes"] * (copies + (0 if "stacks" in d else 1))
    require_memory(need, device, f"the float32 stacks of {case.group} and the temporaries of their use")
    if "stacks" not in d:
        d["stacks"] = [bl.float_stack(b, w.shape[1]) for w, b in zip(d["weights"], d["banks"])]
    return d["stacks"]


def test_task_inference(benchmark, runner, device, size, case, provider):
    d = runner.inputs(case)
    model, x = d["model"], d["x"]
    backend = backend_of(provider)
    if backend:
        fn = lambda: infer(model, x)  # noqa: E731

        def result(out):
            return int(out.task_ids[0]), out.grads[0][0]
    else:
        # official: the mixed stack and, in the backward, autograd's product of the same size
        stacks = _stacks(d, case, device, copies=1 if provider == "official" else 0)
        gemv = provider == "stack_matvec"
        fn = lambda: bl.official_one_shot(d["weights"], stacks, x, gemv=gemv)  # noqa: E731

        def result(out):
            return out

    def expected():
        return bl.exact_alpha_grad(d["weights"], d["banks"], x)

    def check(out):
        task, grad = result(out)
        want = runner.expected(case, "default", expected)
        best = torch.topk(want, min(2, want.numel()), largest=False).values
        # the chosen task must be the true argmin unless the two best are too close to call
        if best.numel() < 2 or float(best[1] - best[0]) > 1e-4 * float(want.abs().max()):
            assert task == int(want.argmin()), f"{provider} chose task {task}, expected {int(want.argmin())}"
        return [grad]

    extra = {}
    if device == "cuda":
        state = case.params["bank_bytes"] if backend else case.params["stack_bytes"]
        with ops.force_backend(backend) if backend else contextlib.nullcontext():
            extra = cuda_peak(fn, state)
    elif size == "full" or (case.id == "lenet-T5" and provider != "stack_matvec"):
        extra = memory_probe(case.params["net"], case.params["T"], "official" if not backend else "supsup_fast",
                             backend, device, gemv=provider == "stack_matvec")
    # the alpha-gradient sums <v, M_t> over every weight of the network
    tol = tolerance(torch.float32, device, terms=sum(w.numel() for w in d["weights"]))
    runner.run(benchmark, case, provider, fn, expected=expected, check=check, tol=tol,
               context=ops.force_backend(backend) if backend else None, extra=extra, graph=False)


# ======================================================================================
# Per-example task inference of a batch, against the machine's floor
# ======================================================================================
def _rows_grid(size: str):
    if size == "tiny":
        return [("lenet", 3, 4)]
    return [(net, t, 8) for net in ("lenet", "fc1024") for t in (250, 2500)]


def params_task_inference_rows(size, device):
    for net, t, b in _rows_grid(size):
        def build(net=net, t=t, b=b):
            model, layers = converted_model(net, t, device)
            return {"model": model, "weights": [layer.weight for layer in layers],
                    "banks": [layer.bank for layer in layers], "x": torch.rand(b, 1, 28, 28, device=device)}

        nk = sum(n * k for n, k in bl.NETS[net])
        bank_bytes = sum(fmt.packed_nbytes((n, k), t) for n, k in bl.NETS[net])
        # floor: the bank read twice (the forward's W * sum_t alpha_t M_t, the backward's <G_r * W, M_t>) with
        # the float32 weights, or B * T * N * K multiply-adds (a [B, NK] x [NK, T] product) at matmul speed
        case = Case(family="task_inference_rows", id=f"{net}-T{t}-B{b}",
                    params={"net": net, "T": t, "B": b, "dtype": "float32", "bank_bytes": bank_bytes,
                            "bank_passes": 2},
                    build=build, bytes=2 * bank_bytes + 2 * 4 * nk, flops=2 * b * t * nk)
        for p in [sf(be) for be in fast_backends("mask_dots", device)]:
            yield case, p


def test_task_inference_rows(benchmark, runner, device, case, provider):
    """Every row's own one-shot inference (``batch_mode="per_example"``): B images, one gradient row each."""
    d = runner.inputs(case)
    model, x = d["model"], d["x"]

    def fn():
        return inference.infer_task(model, x, method="one_shot", objective="g", num_real=bl.NUM_REAL,
                                    batch_mode="per_example")

    def check(out):
        assert out.task_ids.shape == (x.shape[0],)
        return [out.grads[0]]

    tol = tolerance(torch.float32, device, terms=sum(w.numel() for w in d["weights"]))
    runner.run(benchmark, case, provider, fn, check=check, tol=tol, graph=False,
               expected=lambda: [bl.exact_alpha_grad_rows(d["weights"], d["banks"], x)],
               context=ops.force_backend(backend_of(provider)))


# ======================================================================================
# Peak memory of task inference, in a fresh process
# ======================================================================================
def cuda_peak(fn, state_bytes: int) -> dict:
    """CUDA: the allocator's peak during one call above what was allocated before, plus the
    provider's own persistent state (its bank or its float32 stacks)."""
    fn()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    work = torch.cuda.max_memory_allocated() - before
    return {"mem_method": "torch.cuda.max_memory_allocated", "state_bytes": state_bytes,
            "peak_work_bytes": work, "peak_bytes": state_bytes + work}


def memory_probe(net: str, num_tasks: int, kind: str, backend, device: str, gemv: bool = False) -> dict:
    """Run one task inference in a fresh interpreter and return its memory figures (CPU)."""
    code = (f"import sys; sys.path.insert(0, {BENCH_DIR!r}); import test_bench_models as m; "
            f"m._probe({net!r}, {num_tasks}, {kind!r}, {backend!r}, {gemv})")
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1]
    return json.loads(line)


def _probe(net: str, num_tasks: int, kind: str, backend, gemv: bool) -> None:
    """(In the child process.) Print the memory figures of one one-shot task inference as JSON."""
    import gc

    torch.manual_seed(0)
    model, layers = converted_model(net, 0, "cpu")
    x = one_image("cpu")
    gc.collect()
    before, before_anon = bl.rss_bytes(), bl.anon_rss_bytes()
    banks = [words_like((num_tasks, *fmt.packed_shape(layer.weight.shape)), layer.weight.shape[1], "cpu")
             for layer in layers]
    if kind == "supsup_fast":
        for layer, bank in zip(layers, banks):
            layer.bank = bank
        state = sum(b.numel() * 4 for b in banks)
        ctx = ops.force_backend(backend)

        def run():
            return infer(model, x)
    else:
        weights = [layer.weight for layer in layers]
        stacks = [bl.float_stack(b, w.shape[1]) for w, b in zip(weights, banks)]
        del banks
        state = sum(s.numel() * 4 for s in stacks)
        ctx = ops.force_backend(None)

        def run():
            return bl.official_one_shot(weights, stacks, x, gemv=gemv)
    with ctx:
        run()  # warm-up: thread pools, allocator caches
        gc.collect()
        after_state, after_state_anon = bl.rss_bytes(), bl.anon_rss_bytes()
        exact = bl.reset_peak_rss()
        run()
        peak = bl.peak_rss_bytes()
    work = peak - after_state
    print(json.dumps({
        "mem_method": ("RssAnon state + VmHWM above the reset (clear_refs)" if exact
                       else "RssAnon state + ru_maxrss (not reset: upper bound)"),
        "state_bytes": state,
        "anon_state_bytes": after_state_anon - before_anon,
        "rss_state_bytes": after_state - before,
        "peak_bytes": after_state_anon - before_anon + work,
        "peak_work_bytes": work,
    }))


# ======================================================================================
# A training step of one task
# ======================================================================================
def _train_grid(size: str):
    if size == "tiny":
        return [("lenet", 8, "threshold"), ("lenet", 8, "topk")]
    return [(net, 128, b) for net in ("lenet", "fc1024") for b in ("threshold", "topk")]


def params_train_step(size, device):
    for net, batch, binariser in _train_grid(size):
        def build(net=net, batch=batch):
            _, layers = converted_model(net, 0, device)
            weights = [layer.weight.detach().clone() for layer in layers]
            scores = [torch.empty_like(w).uniform_(-1, 1) / w.shape[1] ** 0.5 for w in weights]
            return {"weights": weights, "scores": scores,
                    "x": torch.rand(batch, 1, 28, 28, device=device),
                    "y": torch.randint(0, bl.NUM_REAL, (batch,), device=device)}

        case = Case(family="train_step", id=f"{net}-B{batch}-{binariser}",
                    params={"net": net, "B": batch, "binariser": binariser, "optimizer": "rmsprop", "dtype": "float32"},
                    build=build)
        for p in [sf(b) for b in fast_backends("masked_linear", device)] + ["official", "dense"]:
            yield case, p


def _step_fn(model, params, x, y):
    opt = torch.optim.RMSprop(params, lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def test_train_step(benchmark, runner, device, case, provider):
    d = runner.inputs(case)
    net, binariser = case.params["net"], case.params["binariser"]
    x, y = d["x"], d["y"]
    backend = backend_of(provider)
    if backend:
        model, layers = converted_model(net, 0, device, binariser)
        model.train()
        convert.begin_task(model)
        with torch.no_grad():
            for layer, s in zip(layers, d["scores"]):
                layer.scores.copy_(s)
        params = convert.task_parameters(model)
    elif provider == "official":
        model = bl.official_train_net(d["weights"], d["scores"], binariser)
        params = list(model.parameters())
    else:
        model = bl.dense_net(net, d["weights"])
        params = list(model.parameters())
    fn = _step_fn(model, params, x, y)

    def expected():
        if provider == "dense":
            ref_model = bl.dense_net(net, [w.double() for w in d["weights"]])
        else:
            ref_model = bl.official_train_net([w.double() for w in d["weights"]], [s.double() for s in d["scores"]],
                                              binariser)
        ref_params = list(ref_model.parameters())
        with torch.enable_grad():
            loss = _step_fn(ref_model, ref_params, x.double(), y)()
        return [loss, *[p.detach() for p in ref_params]]

    runner.run(benchmark, case, provider, fn, expected=expected,
               expected_key="dense" if provider == "dense" else "masked",
               check=lambda loss: [loss, *[p.detach() for p in params]],
               context=ops.force_backend(backend) if backend else None, graph=False)
