"""HopSupSup on SplitMNIST-5k, and a modern-Hopfield mask memory beside the paper's Storkey one.

:func:`run_hopsupsup` is what ``supsup-fast hopfield`` executes. With the defaults it is the
paper's set-up (Wortsman et al., 2020, section 5 and the ``hopsupsup`` experiment of its code):

* network: BNNet, 784-2048-2048-10, frozen signed-constant weights, batch norm without affine
  parameters or running statistics whose scale is the task's unit mask, Swish; outputs are the
  ten digits (labels not remapped per task);
* masks: one per task over the 4096 hidden units, scores from zeros, straight-through
  threshold, SGD lr 0.1, momentum 0.9, weight decay 1e-4, 100 batches of 128 (the paper trains
  one epoch of full MNIST, ~94 batches; MNIST-5k holds 800 training images per task);
* memory: one Storkey Hopfield network per hidden layer (two of ``d = 2048``);
* recovery: from test batches of 64 alone (no labels, no task id), 30 SGD steps (lr 500,
  momentum 0.9, weight decay 1e-4) on ``(1 - b/30) H + 1.5e-3 (b/30) E`` from the mean stored
  pattern, ``H`` the output entropy over the ten outputs.

One change to the paper's recovery: the entropy gradient reaches the scores through the memory
(``gradient="memory"``, :func:`supsup_fast.hopfield.recover`). The paper's plain gradient is run
on the same masks and batches beside it (``paper_baseline``), so the JSON shows both.

Also on the same masks: a modern Hopfield memory (:mod:`supsup_fast.modern_hopfield`, the masks
as bit-packed stored patterns), and, with ``stress`` sizes, a synthetic stress test of both
memories with up to thousands of random masks at ``d = stress_d``.

Outputs in ``out_dir``: ``hopfield_results.json`` (every figure, the whole config, the data
description, the environment) and ``hopfield_results.png`` beside it.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Optional

import torch
from tqdm.auto import tqdm

from .. import hopfield, objectives
from ..errors import SupsupError
from ..modern_hopfield import ModernHopfieldMaskMemory
from . import data, run_dir

__all__ = ["HopSupSupConfig", "MEMORIES", "run_hopsupsup", "hopsupsup_table", "plot_hopsupsup", "stress_test",
           "entropy_gradient_diagnosis"]

MEMORIES = ("storkey", "modern")
STORKEY_LAYOUTS = ("per_layer", "joint")  # one network per hidden layer (the paper), or one over all units
RESULTS_JSON = "hopfield_results.json"
RESULTS_PNG = "hopfield_results.png"


@dataclass
class HopSupSupConfig:
    """Every knob of :func:`run_hopsupsup` (the ``supsup-fast hopfield`` flags map one to one)."""

    # network
    hidden: list = field(default_factory=lambda: [2048, 2048])
    outputs: int = 10
    remap_labels: bool = False
    activation: str = "swish"
    gate: str = "before_activation"
    # task masks
    train_steps: int = 100
    train_batch_size: int = 128
    train_optimizer: str = "sgd"
    train_lr: float = 0.1
    train_momentum: float = 0.9
    train_weight_decay: float = 1e-4
    train_init: str = "zeros"
    # memories
    memories: list = field(default_factory=lambda: list(MEMORIES))
    rule: str = "storkey"
    storkey_layout: str = "per_layer"
    modern_beta: Optional[float] = None
    paper_baseline: bool = True
    # recovery
    recover_steps: int = 30
    recover_batch_size: int = 64
    recover_lr: float = 500.0
    recover_momentum: float = 0.9
    recover_weight_decay: float = 1e-4
    gamma: float = 1.5e-3
    init: str = "mean"
    gradient: str = "memory"
    recover_seeds: list = field(default_factory=lambda: [1])
    # synthetic stress test (empty: none)
    stress: list = field(default_factory=list)
    stress_d: int = 2048
    stress_targets: int = 20
    stress_noise: float = 0.2
    # run
    seed: int = 0
    mask_cache: Optional[str] = None
    out_dir: str = "supsup_runs/hopfield"
    progress: bool = True

    def validate(self) -> None:
        def need(cond, msg):
            if not cond:
                raise SupsupError(msg)

        def positive_int(name):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                 f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")

        def non_negative(name):
            v = getattr(self, name)
            need(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0,
                 f"--{name.replace('_', '-')} must be a finite number >= 0, got {v!r}")

        need(isinstance(self.hidden, (list, tuple)) and len(self.hidden) >= 1
             and all(isinstance(h, int) and h >= 2 for h in self.hidden),
             f"--hidden must be one or more layer sizes >= 2, got {self.hidden!r}")
        for name in ("outputs", "train_steps", "train_batch_size", "recover_steps", "recover_batch_size",
                     "stress_d", "stress_targets"):
            positive_int(name)
        for name in ("train_lr", "train_momentum", "train_weight_decay", "recover_lr", "recover_momentum",
                     "recover_weight_decay", "gamma"):
            non_negative(name)
        need(self.train_lr > 0 and self.recover_lr > 0, "--train-lr and --recover-lr must be > 0")
        classes = 2 if self.remap_labels else 10
        need(self.outputs >= classes, f"--outputs {self.outputs} is fewer than the {classes} labels "
                                      f"({'per task' if self.remap_labels else 'digits'})")
        need(self.activation in hopfield.ACTIVATIONS, f"--activation must be one of {hopfield.ACTIVATIONS}")
        need(self.gate in hopfield.GATES, f"--gate must be one of {hopfield.GATES}")
        need(self.train_optimizer in ("sgd", "adam"), "--train-optimizer must be 'sgd' or 'adam'")
        need(self.train_init in ("zeros", "uniform"), "--train-init must be 'zeros' or 'uniform'")
        need(self.rule in ("storkey", "simplified", "hebbian"), "--rule must be storkey, simplified or hebbian")
        need(self.storkey_layout in STORKEY_LAYOUTS, f"--storkey-layout must be one of {STORKEY_LAYOUTS}")
        need(isinstance(self.memories, (list, tuple)) and len(self.memories) >= 1
             and all(m in MEMORIES for m in self.memories) and len(set(self.memories)) == len(self.memories),
             f"--memories must be distinct names from {MEMORIES}, got {self.memories!r}")
        need(self.modern_beta is None or (math.isfinite(self.modern_beta) and self.modern_beta > 0),
             f"--modern-beta must be > 0, got {self.modern_beta!r}")
        need(self.init in ("mean", "zeros"), "--init must be 'mean' or 'zeros'")
        need(self.gradient in hopfield.GRADIENTS, f"--gradient must be one of {hopfield.GRADIENTS}")
        need(isinstance(self.recover_seeds, (list, tuple)) and len(self.recover_seeds) >= 1
             and all(isinstance(v, int) for v in self.recover_seeds),
             f"--recover-seeds must be one or more integers, got {self.recover_seeds!r}")
        need(all(isinstance(n, int) and n >= 1 for n in self.stress), f"--stress sizes must be positive, got {self.stress}")
        need(0 <= self.stress_noise < 0.5, f"--stress-noise is a fraction of flipped bits in [0, 0.5), got {self.stress_noise}")

    def training_key(self) -> dict:
        """What the trained masks depend on (a mask cache must match it)."""
        keys = ("hidden", "outputs", "remap_labels", "activation", "gate", "train_steps", "train_batch_size",
                "train_optimizer", "train_lr", "train_momentum", "train_weight_decay", "train_init", "seed")
        return {k: getattr(self, k) for k in keys} | {"hidden": list(self.hidden)}


# --------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------
def _train_masks(cfg: HopSupSupConfig, model, bench, progress: bool) -> list:
    return [hopfield.train_unit_mask(model, bench.infinite_batches(t, cfg.train_batch_size, seed=cfg.seed),
                                     steps=cfg.train_steps, lr=cfg.train_lr, seed=cfg.seed + t,
                                     optimizer=cfg.train_optimizer, momentum=cfg.train_momentum,
                                     weight_decay=cfg.train_weight_decay, init=cfg.train_init)
            for t in tqdm(range(bench.num_tasks), desc="training unit masks", disable=not progress)]


def _masks(cfg: HopSupSupConfig, model, bench, progress: bool) -> tuple[list, dict]:
    """The task masks, trained or read from ``cfg.mask_cache`` (safetensors; refused if trained otherwise)."""
    from safetensors.torch import load_file, safe_open, save_file

    key = json.dumps(cfg.training_key(), sort_keys=True)
    path = cfg.mask_cache
    if path and os.path.exists(path):
        with safe_open(path, "pt") as f:
            cached = (f.metadata() or {}).get("training")
        if cached != key:
            raise SupsupError(f"mask cache {path} holds masks trained with {cached}, not {key}: "
                              "delete it or give another --mask-cache")
        stack = load_file(path)["masks"]
        return list(stack.unbind(0)), {"source": "cache", "path": path, "train_seconds": None}
    t0 = time.perf_counter()
    masks = _train_masks(cfg, model, bench, progress)
    info = {"source": "trained", "path": path, "train_seconds": time.perf_counter() - t0}
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        save_file({"masks": torch.stack(masks).contiguous()}, path, metadata={"training": key})
    return masks, info


# --------------------------------------------------------------------------------------
# Recovery on SplitMNIST
# --------------------------------------------------------------------------------------
def _storkey_sizes(cfg: HopSupSupConfig) -> list:
    return list(cfg.hidden) if cfg.storkey_layout == "per_layer" else [sum(cfg.hidden)]


def _memory(kind: str, cfg: HopSupSupConfig, masks):
    if kind == "storkey":
        mem = hopfield.LayeredMaskMemory.storkey(_storkey_sizes(cfg), cfg.rule)
    else:
        mem = ModernHopfieldMaskMemory(sum(cfg.hidden), beta=cfg.modern_beta)
    mem.store_all(masks)
    return mem


def _recover_kwargs(cfg: HopSupSupConfig, gradient: str) -> dict:
    return dict(steps=cfg.recover_steps, lr=cfg.recover_lr, momentum=cfg.recover_momentum, gamma=cfg.gamma,
                init=cfg.init, weight_decay=cfg.recover_weight_decay, gradient=gradient)


def _entropy_objective(model, bench, task: int, cfg: HopSupSupConfig, batch_seed: int):
    # every memory sees the same sequence of unlabelled test batches of the task
    batches = bench.infinite_batches(task, cfg.recover_batch_size, seed=batch_seed, split="test")
    return lambda mask: objectives.entropy(model(next(batches)[0], mask))


def _recover_all(name: str, mem, gradient: str, model, bench, masks, exact_acc, cfg, progress) -> dict:
    rows = []
    t0 = time.perf_counter()
    runs = [(b, t) for b in cfg.recover_seeds for t in range(len(masks))]
    for batch_seed, t in tqdm(runs, desc=f"recovering ({name})", disable=not progress):
        tr = hopfield.recovery_trace(mem, _entropy_objective(model, bench, t, cfg, batch_seed), masks[t],
                                     **_recover_kwargs(cfg, gradient))
        rows.append({"task": t, "batch_seed": batch_seed, "hamming": tr["hamming"],
                     "final_hamming": tr["final_hamming"], "steps_to_converge": tr["steps_to_converge"],
                     "exact_acc": exact_acc[t],
                     "recovered_acc": hopfield.mask_accuracy(model, tr["mask"], bench.test_loader(t, 500)),
                     "nearest_stored": int(torch.stack([(tr["mask"] != m).sum() for m in masks]).argmin())})
    seconds = time.perf_counter() - t0
    conv = [r["steps_to_converge"] for r in rows if r["steps_to_converge"] is not None]
    return {"memory": "storkey" if name.startswith("storkey") else "modern", "gradient": gradient,
            "layout": (f"{cfg.rule} networks of d = {_storkey_sizes(cfg)}" if name.startswith("storkey")
                       else f"{len(masks)} packed patterns of d = {sum(cfg.hidden)}, beta = {mem.beta:.4g}"),
            "bytes": mem.nbytes(), "tasks": rows, "exact_recoveries": sum(r["final_hamming"] == 0 for r in rows),
            "mean_final_hamming": sum(r["final_hamming"] for r in rows) / len(rows),
            "max_steps_to_converge": max(conv) if len(conv) == len(rows) else None,
            "mean_recovered_acc": sum(r["recovered_acc"] for r in rows) / len(rows),
            "mean_exact_acc": sum(r["exact_acc"] for r in rows) / len(rows), "recoveries": len(rows),
            "seconds": seconds, "seconds_per_step": seconds / (len(rows) * cfg.recover_steps)}


def entropy_gradient_diagnosis(model, bench, masks, cfg: HopSupSupConfig) -> dict:
    """Where the first recovery step's entropy gradient points, per task and Storkey network.

    ``in_span``: the fraction of its norm inside the span of the stored patterns (exact
    projection ``P``); ``storkey_in_span``: the same fraction of ``Psi g``, the gradient after the
    Storkey memory; ``storkey_vs_projector``: ``||Psi - P||_F / ||P||_F``.
    """
    X = torch.stack([hopfield.to_pattern(m) for m in masks])
    sizes = _storkey_sizes(cfg)
    mem = hopfield.LayeredMaskMemory.storkey(sizes, cfg.rule)
    mem.store_all(masks)
    bases = [torch.linalg.qr(c.T).Q for c in torch.split(X, sizes, dim=1)]
    gaps = []
    for q, m in zip(bases, mem.memories):
        p = q @ q.T
        gaps.append(float(torch.linalg.norm(m.psi - p) / torch.linalg.norm(p)))
    rows = []
    for t in range(len(masks)):
        s = mem.pattern_mean().clone().requires_grad_(True)
        h = _entropy_objective(model, bench, t, cfg, cfg.recover_seeds[0])(hopfield._SignSTE.apply(s))
        g = torch.autograd.grad(h, s)[0]
        psi_g = mem.filter_gradient(g)
        in_span, psi_in_span = [], []
        for q, gc, pc in zip(bases, torch.split(g, sizes), torch.split(psi_g, sizes)):
            in_span.append(float(torch.linalg.norm(q.T @ gc) / torch.linalg.norm(gc).clamp_min(1e-30)))
            psi_in_span.append(float(torch.linalg.norm(q.T @ pc) / torch.linalg.norm(pc).clamp_min(1e-30)))
        rows.append({"task": t, "in_span": in_span, "storkey_in_span": psi_in_span})
    return {"per_task": rows, "storkey_vs_projector": gaps,
            "random_direction_in_span": [math.sqrt(len(masks) / h) for h in sizes], "memory_sizes": sizes}


# --------------------------------------------------------------------------------------
# Synthetic stress test
# --------------------------------------------------------------------------------------
def _noisy_preference(target: torch.Tensor, noise: float, gen: torch.Generator):
    """An objective whose own optimum is ``target`` with a fraction ``noise`` of its bits flipped."""
    flips = torch.rand(target.shape, generator=gen) < noise
    hint = hopfield.to_pattern(target ^ flips)
    return (lambda mask: -((2 * mask - 1) * hint).mean()), int(flips.sum())


def stress_test(sizes, d: int = 2048, targets: int = 20, noise: float = 0.2, rule: str = "storkey",
                beta: Optional[float] = None, seed: int = 0, progress: bool = True, **recover_kwargs) -> dict:
    """Both memories holding ``n`` random masks ``[d]`` for every ``n`` in ``sizes`` (stored cumulatively).

    For ``targets`` stored masks spread over the ``n`` (first and last included), recovery runs
    from the mean stored pattern with an objective that prefers the target with a fraction
    ``noise`` of its bits flipped (a stand-in for an entropy that points roughly the right way;
    its own optimum is wrong in ``noise * d`` bits). Records, per memory and ``n``: the
    exact-recovery rate, the final Hamming distances, the steps to converge, the memory's bytes,
    the store time and the time per recovery step.
    """
    sizes = sorted(set(int(n) for n in sizes))
    gen = torch.Generator().manual_seed(seed)
    bank = torch.rand(sizes[-1], d, generator=gen) < 0.5
    memories = {"storkey": hopfield.HopfieldMaskStore(d, rule), "modern": ModernHopfieldMaskMemory(d, beta=beta)}
    kwargs = dict(recover_kwargs)
    out = {"d": d, "targets": targets, "noise": noise, "rule": rule, "seed": seed,
           "beta": beta if beta is not None else "8 ln(T + 1) / d", "recover": kwargs, "bank_bytes_per_mask": 4 * ((d + 31) // 32),
           "storkey_break_even_masks": 32 * d, "capacity_hint_storkey": memories["storkey"].capacity_hint(),
           "rows": []}
    stored = 0
    for n in tqdm(sizes, desc="stress test", disable=not progress):
        store_seconds = {}
        for name, mem in memories.items():
            t0 = time.perf_counter()
            if name == "modern":
                mem.store(bank[stored:n])
            else:
                mem.store_all(bank[stored:n])
            store_seconds[name] = time.perf_counter() - t0
        stored = n
        picks = sorted(set(torch.linspace(0, n - 1, min(targets, n)).round().long().tolist()))
        for name, mem in memories.items():
            tgen = torch.Generator().manual_seed(seed + 1)  # same noisy objectives for both memories
            finals, conv, objective_alone = [], [], []
            t0 = time.perf_counter()
            for i in picks:
                objective, flipped = _noisy_preference(bank[i], noise, tgen)
                tr = hopfield.recovery_trace(mem, objective, bank[i], **kwargs)
                finals.append(tr["final_hamming"])
                conv.append(tr["steps_to_converge"])
                objective_alone.append(flipped)
            seconds = time.perf_counter() - t0
            done = sorted(c for c in conv if c is not None)
            out["rows"].append({
                "memory": name, "stored": n, "targets": len(picks), "exact_rate": sum(f == 0 for f in finals) / len(picks),
                "final_hamming": finals, "mean_final_hamming": sum(finals) / len(finals),
                "objective_alone_hamming": sum(objective_alone) / len(objective_alone),
                "steps_to_converge": conv, "median_steps_to_converge": done[len(done) // 2] if done else None,
                "bytes": mem.nbytes(), "bank_bytes": n * 4 * ((d + 31) // 32),
                "beta": mem.beta if name == "modern" else None,
                "store_seconds_cumulative": store_seconds[name],
                "ms_per_step": 1e3 * seconds / (len(picks) * kwargs.get("steps", 30))})
    return out


# --------------------------------------------------------------------------------------
# The experiment
# --------------------------------------------------------------------------------------
def run_hopsupsup(cfg: Optional[HopSupSupConfig] = None, **overrides) -> dict:
    """Run HopSupSup as ``cfg`` (default: the paper's set-up, see the module docstring) describes.

    Keyword ``overrides`` replace fields of ``cfg`` (``run_hopsupsup(hidden=[256, 256])``).
    Returns (and writes) the results.
    """
    cfg = replace(cfg or HopSupSupConfig(), **overrides)
    if isinstance(cfg.hidden, tuple):
        cfg.hidden = list(cfg.hidden)
    cfg.validate()
    t_start = time.perf_counter()
    env = _environment()
    progress = cfg.progress
    torch.manual_seed(cfg.seed)
    bench = data.SplitMNIST(data.mnist_5k(), flatten=True, remap_labels=cfg.remap_labels)
    model = hopfield.HiddenMaskedMLP((784, *cfg.hidden, cfg.outputs), seed=cfg.seed, activation=cfg.activation,
                                     gate=cfg.gate)
    masks, mask_info = _masks(cfg, model, bench, progress)
    exact_acc = [hopfield.mask_accuracy(model, m, bench.test_loader(t, 500)) for t, m in enumerate(masks)]
    stack = torch.stack(masks)
    results = {
        "config": asdict(cfg), "data": bench.describe(), "environment": env,
        "masks": {**mask_info, "d": model.d, "exact_acc": exact_acc,
                  "density": stack.float().mean(1).tolist(),
                  "pairwise_hamming": (stack[:, None] != stack[None]).sum(-1).tolist(),
                  "exact_bank_bytes": len(masks) * 4 * ((model.d + 31) // 32)},
        "recoveries": {},
    }
    variants = []
    for kind in cfg.memories:
        variants.append((kind, kind, cfg.gradient))
        if kind == "storkey" and cfg.paper_baseline and cfg.gradient != "plain":
            variants.append(("storkey_plain", kind, "plain"))
    for name, kind, gradient in variants:
        mem = _memory(kind, cfg, masks)
        results["recoveries"][name] = _recover_all(name, mem, gradient, model, bench, masks, exact_acc, cfg, progress)
    if "storkey" in cfg.memories:
        results["diagnosis"] = entropy_gradient_diagnosis(model, bench, masks, cfg)
    if cfg.stress:
        results["stress"] = stress_test(cfg.stress, d=cfg.stress_d, targets=cfg.stress_targets, noise=cfg.stress_noise,
                                        rule=cfg.rule, beta=cfg.modern_beta, seed=cfg.seed, progress=progress,
                                        **_recover_kwargs(cfg, cfg.gradient))
    results["seconds"] = time.perf_counter() - t_start
    results["environment"]["load_average_end"] = _load_average()
    os.makedirs(cfg.out_dir, exist_ok=True)
    run_dir.write_json(os.path.join(cfg.out_dir, RESULTS_JSON), results)
    results["plot_path"] = plot_hopsupsup(results, os.path.join(cfg.out_dir, RESULTS_PNG))
    return results


def hopsupsup_table(results: dict) -> str:
    """The end-of-run summary the CLI prints."""
    c, m = results["config"], results["masks"]
    lines = [f"HopSupSup on SplitMNIST-5k: 784-{'-'.join(map(str, c['hidden']))}-{c['outputs']} "
             f"({c['activation']}, mask {c['gate'].replace('_', ' ')}), d = {m['d']} units, "
             f"{c['recover_steps']} recovery steps, gamma {c['gamma']}, masks {m['source']}"]
    for name, r in results["recoveries"].items():
        lines += ["", f"{name}: {r['layout']}, {r['gradient']} gradient, {r['bytes'] / 2**20:.3f} MiB",
                  f"{'task' if len(c['recover_seeds']) == 1 else 'task/b':>6} | {'hamming':>7} | {'converged at':>12} | "
                  f"{'exact-mask acc':>14} | {'recovered acc':>13}", "-" * 66]
        for row in r["tasks"]:
            conv = row["steps_to_converge"]
            task = str(row["task"]) if len(c["recover_seeds"]) == 1 else f"{row['task']}/{row['batch_seed']}"
            lines.append(f"{task:>6} | {row['final_hamming']:>7} | {('step ' + str(conv)) if conv else '-':>12} | "
                         f"{100 * row['exact_acc']:>13.2f}% | {100 * row['recovered_acc']:>12.2f}%")
        if len(c["recover_seeds"]) > 1:
            lines.append("(task/b: task / seed of the order of its test batches)")
        lines.append(f"exact recoveries: {r['exact_recoveries']} of {r['recoveries']}; mean Hamming "
                     f"{r['mean_final_hamming']:.1f}; {r['seconds']:.1f} s")
    if "stress" in results:
        s = results["stress"]
        lines += ["", f"stress test: random masks, d = {s['d']}, objective wrong in {100 * s['noise']:.0f}% of bits, "
                      f"{s['targets']} targets per size",
                  f"{'memory':>8} | {'stored':>6} | {'exact':>6} | {'mean Hamming':>12} | {'steps':>5} | {'bytes':>10}",
                  "-" * 62]
        for row in s["rows"]:
            st = row["median_steps_to_converge"]
            lines.append(f"{row['memory']:>8} | {row['stored']:>6} | {100 * row['exact_rate']:>5.0f}% | "
                         f"{row['mean_final_hamming']:>12.1f} | {st if st is not None else '-':>5} | {row['bytes']:>10}")
    lines += ["", f"exact mask bank: {m['exact_bank_bytes']} bytes; time {results['seconds']:.1f} s"]
    return "\n".join(lines)


def plot_hopsupsup(results: dict, path: str) -> str:
    """Hamming distance vs step per task for every recovery (and the stress test, if run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stress = results.get("stress")
    ncols = 1 + (2 if stress else 0)
    fig, axes = plt.subplots(1, ncols, figsize=(6.5 * ncols, 4.6), squeeze=False)
    ax = axes[0][0]
    c = results["config"]
    styles = {"storkey": "-", "storkey_plain": "--", "modern": ":"}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for name, r in results["recoveries"].items():
        for row in r["tasks"]:
            steps = range(1, len(row["hamming"]) + 1)
            first = row["batch_seed"] == c["recover_seeds"][0]
            ax.plot(steps, row["hamming"], styles.get(name, "-."), color=colors[row["task"] % len(colors)],
                    lw=1.5 if first else 0.6, alpha=1.0 if first else 0.6)
        ax.plot([], [], styles.get(name, "-."), color="black", label=f"{name} ({r['gradient']} gradient)")
    for t in range(len(results["masks"]["exact_acc"])):
        ax.plot([], [], color=colors[t % len(colors)], lw=4, label=f"task {t}")
    ax.set_yscale("symlog", linthresh=1)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("recovery step")
    ax.set_ylabel("Hamming distance to the task's mask")
    seeds = c["recover_seeds"]
    ax.set_title(f"SplitMNIST-5k, d = {results['masks']['d']} ({'+'.join(map(str, c['hidden']))})"
                 + (f"; thin: batch orders {seeds[1:]}" if len(seeds) > 1 else ""), fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    if stress:
        ax1, ax2 = axes[0][1], axes[0][2]
        for mem, style in (("storkey", "o-"), ("modern", "s-")):
            rows = [r for r in stress["rows"] if r["memory"] == mem]
            ax1.plot([r["stored"] for r in rows], [100 * r["exact_rate"] for r in rows], style, label=mem)
            ax2.plot([r["stored"] for r in rows], [r["bytes"] for r in rows], style, label=f"{mem} memory")
        rows = [r for r in stress["rows"] if r["memory"] == "modern"]
        ax2.plot([r["stored"] for r in rows], [r["bank_bytes"] for r in rows], "k:", label="1-bit mask bank")
        ax1.axvline(stress["capacity_hint_storkey"], color="gray", lw=0.8, ls="--", label="d / sqrt(2 ln d)")
        ax1.set_xscale("log")
        ax1.set_xlabel("stored masks")
        ax1.set_ylabel("exact recoveries (%)")
        ax1.set_title(f"random masks, d = {stress['d']}, objective wrong in {100 * stress['noise']:.0f}% of bits")
        ax1.grid(True, alpha=0.3)
        ax1.legend(fontsize=8)
        ax2.set_xscale("log")
        ax2.set_yscale("log")
        ax2.set_xlabel("stored masks")
        ax2.set_ylabel("bytes")
        ax2.set_title(f"memory size (Storkey breaks even at 32 d = {stress['storkey_break_even_masks']} masks)")
        ax2.grid(True, alpha=0.3)
        ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _load_average() -> Optional[list]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _environment() -> dict:
    from .. import __version__
    from ..info import collect, cpu_model

    info = collect()
    return {**{k: info[k] for k in ("python", "torch", "threads", "extension_loaded")},
            "supsup_fast": __version__, "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
            "load_average_start": _load_average()}

