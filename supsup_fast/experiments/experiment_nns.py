"""The NNs scenario of ``supsup-fast run``: one stream of batches, no task identity anywhere.

:class:`~supsup_fast.nns.NNsTrainer` sees task after task (``iterations`` batches each, nothing
marks a boundary) and allocates a mask whenever its novelty test says no mask fits. What is
recorded, beside the usual results:

* per task: masks allocated once its stream ended, the mask that trained on most of its batches
  (*its* mask) and the share of its batches that mask got, and the novelty decisions taken
  during its stream;
* every novelty check: batch, masks, slots, ``max nu``, ``S * max nu`` (novel below
  ``1 + epsilon``), argmax slot, decision, which test found the data novel (``belief`` or
  ``own_entropy``) and the believed mask's own output entropy where it was measured;
* accuracy vs tasks: at each checkpoint, a copy of the model with the open mask frozen is
  measured like a GN run, except that the right answer for task ``t``'s images is *its* mask
  (masks are the trainer's, tasks the stream's: with exactly one allocation per task, mask
  ``t`` is task ``t``'s). NNs accuracy counts an image when its inferred mask is its task's
  mask and the class is right (a wrong mask scores 0, as in GNu); GG accuracy on the same
  images classifies them with their task's mask.
"""

from __future__ import annotations

import copy
import time
from collections import Counter

from tqdm.auto import tqdm

from .. import convert, training
from ..nns import NNsTrainer

#: Decisions a novelty check can take (:meth:`~supsup_fast.nns.NNsTrainer.check`).
DECISIONS = ("new", "switch", "continue")


def train_nns(model, bench, cfg, results: dict, progress: bool, measure, checkpoints) -> None:
    """Run the NNs stream of ``cfg`` on ``model``; fills ``results`` (``measure`` is the GN measurement)."""
    trainer = NNsTrainer(model, cfg.optimizer, lr=cfg.lr, objective=cfg.objective,
                         num_real=bench.num_classes if cfg.objective == "g" else None,
                         budget=max(2500, cfg.tasks), check_every=cfg.check_every, seed=cfg.seed)
    per_task, mask_of_task = [], []
    measuring = 0.0  # seconds spent measuring at checkpoints, not training
    t0 = time.perf_counter()
    for t in tqdm(range(cfg.tasks), desc="tasks (identity hidden)", disable=not progress):
        stream = bench.infinite_batches(t, cfg.batch_size, seed=cfg.seed)
        first_check = len(trainer.history)
        trained = Counter()
        for _ in tqdm(range(cfg.iterations), desc=f"stream {t}", leave=False, disable=not progress):
            trainer.step(*next(stream))
            trained[trainer.current] += 1  # the mask this batch trained
        mask, batches = max(trained.items(), key=lambda kv: (kv[1], -kv[0]))
        mask_of_task.append(mask)
        decisions = Counter(h["decision"] for h in trainer.history[first_check:])
        per_task.append({"task": t, "masks_after": trainer.num_masks, "mask": mask,
                         "mask_share_of_batches": batches / cfg.iterations,
                         "decisions": {d: decisions.get(d, 0) for d in DECISIONS}})
        if (t + 1) in checkpoints:
            m0 = time.perf_counter()
            snapshot = copy.deepcopy(model)  # the open mask frozen in a copy: the stream goes on untouched
            if any(m.in_training for m in trainer.layers):
                convert.freeze_task(snapshot)
            snapshot.eval()
            results["vs_tasks"].append({**measure(snapshot, t + 1, mask_of_task[: t + 1]),
                                        "masks": convert.num_tasks(snapshot)})
            measuring += time.perf_counter() - m0
    trainer.finish()
    results["train_seconds"] += time.perf_counter() - t0 - measuring
    model.eval()
    for row in per_task:  # each task with its own mask, the task given (GG) -- for reference
        row["gg_accuracy"] = training.evaluate(model, bench.test_loader(row["task"], cfg.test_batch_size),
                                               task=row["mask"])["accuracy"]
    results["per_task"] = per_task
    results["nns"] = {
        "masks_allocated": trainer.num_frozen, "tasks": cfg.tasks, "checks": len(trainer.history),
        "one_mask_per_task": trainer.num_frozen == cfg.tasks and mask_of_task == list(range(cfg.tasks)),
        "mask_of_task": mask_of_task, "check_every": cfg.check_every, "epsilon": trainer.epsilon,
        "min_slots": trainer.min_slots, "objective": cfg.objective,
        "decisions": {d: sum(p["decisions"][d] for p in per_task) for d in DECISIONS},
        "history": [{"batch": h["batch"], "masks": h["masks"], "slots": h["slots"], "nu_max": h["nu_max"],
                     "slots_times_nu_max": h["slots"] * h["nu_max"], "argmax": h["argmax"],
                     "decision": h["decision"], "novel_by": h["novel_by"], "own_entropy": h.get("own_entropy"),
                     "from": h["from"], "to": h["to"]} for h in trainer.history],
        "own_entropy_threshold": trainer.own_entropy,
    }
