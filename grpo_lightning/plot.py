"""Learning curves of one or more runs, drawn from their ``metrics/*.json`` files.

    python -m grpo_lightning plot lightning_logs/sat_tiny/version_0 [RUN_DIR ...] -o curve.png

Two panels: success rate and mean reward against the iteration. Evaluations (the fixed eval
set, the baseline included) are drawn as lines with markers; the training rollouts' values as
faint lines. Several run directories (e.g. seeds) are overlaid, each labelled with its own
name or with ``--labels``. The x-axis counts policy updates, as in TensorBoard: the baseline is
at 0, the rollouts of iteration i at i, the eval after iteration i at i + 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

from .runfiles import read_evals, read_train  # noqa: E402

PANELS = (("success rate", "success_rate", "reward/success_rate"),
          ("mean reward", "reward_mean", "reward/reward_mean"))


def load_curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """``{"eval/<key>": [(step, value)], "train/<key>": [...]}`` for the two plotted metrics."""
    if not (Path(run_dir) / "metrics").is_dir():
        raise ValueError(f"{run_dir} has no metrics/ folder (is it a run directory?)")
    evals, train = read_evals(run_dir), read_train(run_dir)
    curves: dict[str, list[tuple[int, float]]] = {}
    for _, eval_key, train_key in PANELS:
        curves[f"eval/{eval_key}"] = [(step, float(e[eval_key])) for step, e in evals.items()]
        curves[f"train/{eval_key}"] = [(m["iteration"], float(m[train_key])) for m in train]
    return curves


def plot_runs(run_dirs: list[Path], out: Path, labels: list[str] | None = None,
              title: str | None = None) -> Path:
    labels = labels or [Path(d).parent.name + "/" + Path(d).name for d in run_dirs]
    if len(labels) != len(run_dirs):
        raise ValueError(f"{len(labels)} labels for {len(run_dirs)} run directories")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for i, (run_dir, label) in enumerate(zip(run_dirs, labels, strict=True)):
        curves = load_curves(run_dir)
        color = f"C{i}"
        for ax, (name, key, _) in zip(axes, PANELS, strict=True):
            train = curves[f"train/{key}"]
            if train:
                ax.plot(*zip(*train, strict=True), color=color, alpha=0.25, linewidth=1)
            evals = curves[f"eval/{key}"]
            if evals:
                ax.plot(*zip(*evals, strict=True), color=color, marker="o", label=f"{label} (eval)")
            ax.set_xlabel("iteration (policy updates)")
            ax.set_ylabel(name)
            ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="best")
    axes[1].set_title("faint: training rollouts; markers: fixed eval set", fontsize=9)
    if title:
        fig.suptitle(title)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m grpo_lightning plot", description=__doc__.splitlines()[0])
    ap.add_argument("run_dirs", nargs="+", type=Path, help="run directories (lightning_logs/NAME/version_N)")
    ap.add_argument("-o", "--output", type=Path, default=Path("curve.png"), help="the image to write")
    ap.add_argument("--labels", nargs="+", help="one legend label per run directory")
    ap.add_argument("--title", help="figure title")
    args = ap.parse_args(argv)
    try:
        out = plot_runs(args.run_dirs, args.output, args.labels, args.title)
    except (ValueError, KeyError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
