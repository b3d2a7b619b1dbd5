"""2D density benchmark: exact-grid test NLL of the default EBM vs the entropy floor and a CV-KDE.

One row per dataset, one run, a fixed training set of 20,000 points per dataset, default settings::

    python benchmarks/toy_density.py --json reports/bench/toy.json --figure reports/bench/toy.png

Columns: the EBM's test NLL (nats/point, grid log Z), the true density's NLL on the same test points
(the entropy floor), their gap (≈ KL), the cross-validated Gaussian KDE's NLL and gap, MMD² between
long-run sampler output and held-out data, and training time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from ebm.config import to_dict
from ebm.data.toy2d import TOY_DATASETS, make_toy_dataset
from ebm.evaluation.density2d import evaluate_density
from ebm.plots import DensityPanel, plot_density_grid, save_figure
from ebm.toy import Toy2DConfig, sample_energy, train_energy

GAP_GOAL = 0.02


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--datasets", nargs="+", default=list(TOY_DATASETS), choices=list(TOY_DATASETS))
    parser.add_argument("--n-train", type=int, default=20_000)
    parser.add_argument("--n-test", type=int, default=20_000)
    parser.add_argument(
        "--steps", type=int, default=None, help="override training steps (default: the recipe's)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the table as JSON here")
    parser.add_argument("--figure", type=Path, default=None, help="write the multi-panel heatmap PNG here")
    args = parser.parse_args(argv)

    config = Toy2DConfig()
    if args.steps is not None:
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, steps=args.steps))
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, progress=False))
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; recipe: {json.dumps(to_dict(config))}"
    )

    rows, panels = [], []
    columns = ("EBM NLL", "floor", "EBM gap", "KDE NLL", "KDE gap")
    print(f"{'dataset':<13}" + "".join(f"{c:>9}" for c in columns) + f"{'MMD²':>10}{'train s':>9}")
    for index, name in enumerate(args.datasets):
        dataset = make_toy_dataset(name)
        x_train = dataset.sample(
            args.n_train, generator=torch.Generator().manual_seed(args.seed * 1000 + index)
        )
        x_test = dataset.sample(
            args.n_test, generator=torch.Generator().manual_seed(args.seed * 1000 + 500 + index)
        )
        start = time.perf_counter()
        energy, result = train_energy(x_train, config, bounds=dataset.bounds)
        train_seconds = time.perf_counter() - start
        samples = sample_energy(
            energy, config, dataset.bounds, generator=torch.Generator().manual_seed(args.seed)
        )
        report = evaluate_density(
            energy,
            bounds=dataset.bounds,
            x_test=x_test,
            true_log_prob=dataset.log_prob,
            x_train=x_train,
            samples=samples,
        )
        row = {
            "dataset": name,
            **dataclasses.asdict(report),
            "train_seconds": train_seconds,
            "steps": result.steps,
            "recoveries": result.recoveries,
        }
        rows.append(row)
        print(
            f"{name:<13}{report.nll:>9.4f}{report.entropy_floor:>9.4f}{report.gap:>9.4f}{report.kde_nll:>9.4f}"
            f"{report.kde_gap:>9.4f}{report.mmd:>10.2e}{train_seconds:>9.1f}",
            flush=True,
        )
        panels.append(
            DensityPanel(
                name=name,
                energy=energy,
                bounds=dataset.bounds,
                true_log_prob=dataset.log_prob,
                data=x_train,
                samples=samples,
                nll=report.nll,
                gap=report.gap,
            )
        )

    within = sum(r["gap"] <= GAP_GOAL for r in rows)
    beats_kde = sum(r["nll"] < r["kde_nll"] for r in rows)
    median_seconds = sorted(r["train_seconds"] for r in rows)[len(rows) // 2]
    print(
        f"\nwithin {GAP_GOAL} nats of the floor: {within}/{len(rows)}; "
        f"lower NLL than CV-KDE: {beats_kde}/{len(rows)}; median training time {median_seconds:.1f} s"
    )
    summary = {
        "rows": rows,
        "within_goal": within,
        "beats_kde": beats_kde,
        "gap_goal": GAP_GOAL,
        "config": to_dict(config),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2))
    if args.figure is not None:
        save_figure(plot_density_grid(panels), args.figure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
