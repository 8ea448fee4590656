"""The standard continual-learning metrics of a run, from its accuracy matrix.

``R[i][j]`` is the accuracy on task ``j`` after learning tasks ``0..i`` (``j <= i``), measured on
the task's evaluated test images (:func:`~supsup_fast.experiments.experiment.eval_batches`): GG
classifies them with task ``j``'s own mask, GN infers the task first (a wrong task scores 0 in
GNu). A row is measured after every task for runs of at most :data:`FULL_MATRIX_TASKS` tasks,
else at the run's checkpoints only; GG's diagonal ``R[j][j]`` is measured after every task.

From the rows that were measured:

* average accuracy: the mean of the last row;
* backward transfer (Lopez-Paz & Ranzato 2017): ``mean_j (R[T-1][j] - R[first][j])`` over
  ``j < T-1``, where ``first`` is the first measured row holding task ``j`` (the diagonal, when
  every row is measured);
* forgetting (Chaudhry et al. 2018): ``f_j = max_{i < T-1} R[i][j] - R[T-1][j]`` over the measured
  rows, and its mean over ``j < T-1``.

SupSup's frozen masks make GG's forgetting 0 by construction; it is measured here, not assumed.
"""

from __future__ import annotations

from typing import Optional, Sequence

#: Runs with at most this many tasks measure a row of R after every task (O(T^2) evaluations).
FULL_MATRIX_TASKS = 100


def matrix_rows(tasks: int, checkpoints: Sequence[int]) -> list[int]:
    """Numbers of tasks learned after which a row of R is measured."""
    if tasks <= FULL_MATRIX_TASKS:
        return list(range(1, tasks + 1))
    return sorted(set(int(c) for c in checkpoints) | {tasks})


def summarise(rows: dict[int, list[float]], diagonal: Optional[Sequence[float]] = None) -> Optional[dict]:
    """Average accuracy, backward transfer and forgetting from the measured rows of R.

    ``rows[n]`` is the row after ``n`` tasks: ``n`` accuracies, task 0 first; ``diagonal[j]`` (if
    given) is ``R[j][j]``, measured after every task. ``None`` without rows."""
    if not rows:
        return None
    after = sorted(rows)
    for n in after:
        if len(rows[n]) != n:
            raise ValueError(f"row after {n} tasks has {len(rows[n])} entries")
    last = rows[after[-1]]
    earlier = [rows[n] for n in after[:-1]]
    first_seen, forgetting = [], []
    for j in range(len(last) - 1):
        held = [r[j] for r in earlier if len(r) > j]
        if diagonal is not None:
            held.insert(0, diagonal[j])
        first_seen.append(held[0] if held else last[j])
        forgetting.append(max(held) - last[j] if held else 0.0)
    bwt = [last[j] - first_seen[j] for j in range(len(first_seen))]
    return {
        "average_accuracy": sum(last) / len(last),
        "backward_transfer": sum(bwt) / len(bwt) if bwt else 0.0,
        "forgetting": forgetting,
        "mean_forgetting": sum(forgetting) / len(forgetting) if forgetting else 0.0,
        "max_forgetting": max(forgetting) if forgetting else 0.0,
        "rows_measured": len(after),
    }


def plot_accuracy_matrix(matrix: dict, path: str, title: str = "") -> Optional[str]:
    """Heat map of R (GG and, where measured, GN side by side); unmeasured cells are blank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    kinds = [k for k in ("gg", "gn") if matrix.get(k)]
    if not kinds:
        return None
    tasks = max(max(int(n) for n in matrix[k]) for k in kinds)
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.2 * len(kinds), 4.4), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        grid = np.full((tasks, tasks), np.nan)
        if kind == "gg":  # the diagonal is measured after every task, also between sparse rows
            diag = [100 * v for v in matrix.get("gg_diagonal", [])[:tasks]]
            grid[range(len(diag)), range(len(diag))] = diag
        for n, row in matrix[kind].items():
            grid[int(n) - 1, : len(row)] = [100 * v for v in row]
        im = ax.imshow(grid, origin="upper", cmap="viridis", vmin=np.nanmin(grid), vmax=100, interpolation="nearest",
                       aspect="auto", extent=(0.5, tasks + 0.5, tasks + 0.5, 0.5))
        ax.set_xlabel("task j (1-based)")
        ax.set_ylabel("after learning task i (1-based)")
        ax.set_title(f"R[i][j], {kind.upper()} accuracy (%)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.yaxis.get_major_locator().set_params(integer=True)
        fig.colorbar(im, ax=ax)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
