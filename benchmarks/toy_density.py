"""2D density benchmark: exact-grid test NLL of the default EBM vs the entropy floor and a CV-KDE.

One row per dataset, one run, a fixed training set of 20,000 points per dataset, default settings::

    python benchmarks/toy_density.py --json reports/bench/toy.json --figure reports/bench/toy.png

Columns: the EBM's test NLL (nats/point, grid log Z), the true density's NLL on the same test points
(the entropy floor), their gap (≈ KL), the gap PCD alone reached before the recipe's exact-likelihood
polish, the cross-validated Gaussian KDE's NLL and gap, MMD² between long-run sampler output and held-out
data, and training time (PCD and polish together).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ebm.checkpoint import write_report_json
from ebm.config import to_dict, whole_number
from ebm.data.toy2d import TOY_DATASETS, ToyDataset, make_toy_dataset
from ebm.evaluation.density2d import converged_log_partition, nll
from ebm.plots import DensityPanel, plot_density_grid, save_figure
from ebm.toy import Toy2DConfig, evaluate_energy, polish_energy, train_energy, train_energy_exact

GAP_GOAL = 0.02
TIME_GOAL_SECONDS = 180.0  # training time per dataset on 2 cores


def draw(name: str, n_train: int, n_test: int, seed: int) -> tuple[ToyDataset, Tensor, Tensor]:
    """Dataset ``name`` and its training and test points, seeded by ``seed`` and the set's place in
    ``TOY_DATASETS`` (not in ``--datasets``), so a run of a few sets draws the full run's points."""
    index = list(TOY_DATASETS).index(name)
    dataset = make_toy_dataset(name)
    x_train = dataset.sample(n_train, generator=torch.Generator().manual_seed(seed * 1000 + index))
    x_test = dataset.sample(n_test, generator=torch.Generator().manual_seed(seed * 1000 + 500 + index))
    return dataset, x_train, x_test


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The bar's counts over the datasets' rows: within the gap goal (and PCD's model before the polish),
    below the KDE's NLL, trained within the time goal; the median training time."""
    return {
        "within_goal": sum(r["gap"] <= GAP_GOAL for r in rows),
        "pcd_within_goal": sum(r["pcd_gap"] <= GAP_GOAL for r in rows),
        "beats_kde": sum(r["nll"] < r["kde_nll"] for r in rows),
        "gap_goal": GAP_GOAL,
        "within_time_goal": sum(r["train_seconds"] <= TIME_GOAL_SECONDS for r in rows),
        "time_goal_seconds": TIME_GOAL_SECONDS,
        "median_train_seconds": statistics.median(r["train_seconds"] for r in rows),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--datasets", nargs="+", default=list(TOY_DATASETS), choices=list(TOY_DATASETS))
    parser.add_argument(
        "--n-train", type=whole_number(5), default=20_000, help="≥ 5, the KDE's folds (default %(default)s)"
    )
    parser.add_argument("--n-test", type=whole_number(2), default=20_000, help="(default %(default)s)")
    parser.add_argument(
        "--steps", type=whole_number(1), default=None, help="override training steps (default: the recipe's)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--device",
        default="cpu",
        help="torch device to train on; the bar is for the CPU (default %(default)s; 'auto' takes a GPU)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the table as JSON here")
    parser.add_argument("--figure", type=Path, default=None, help="write the multi-panel heatmap PNG here")
    parser.add_argument(
        "--exact-reference",
        action="store_true",
        help="also train the same MLP by exact grid likelihood: the gap it reaches is the model's and the "
        "data's share, the rest of the PCD gap is the sampler's",
    )
    args = parser.parse_args(argv)

    config = Toy2DConfig()
    if args.steps is not None:
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, steps=args.steps))
    config = dataclasses.replace(
        config, train=dataclasses.replace(config.train, progress=False, device=args.device)
    )
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; recipe: {json.dumps(to_dict(config))}"
    )

    rows, panels = [], []
    columns = ("EBM NLL", "floor", "EBM gap", "PCD gap", "KDE NLL", "KDE gap") + (
        ("exact gap",) if args.exact_reference else ()
    )
    print(f"{'dataset':<13}" + "".join(f"{c:>10}" for c in columns) + f"{'MMD²':>10}{'train s':>9}")
    for name in args.datasets:
        dataset, x_train, x_test = draw(name, args.n_train, args.n_test, args.seed)
        start = time.perf_counter()
        pcd_config = dataclasses.replace(config, polish=dataclasses.replace(config.polish, steps=0))
        pcd_energy, result = train_energy(x_train, pcd_config, bounds=dataset.bounds)
        pcd_seconds = time.perf_counter() - start
        # the polish starts from PCD's model, as train_energy's does, and leaves it as it was
        energy, polish = polish_energy(pcd_energy, x_train, config, bounds=dataset.bounds)
        train_seconds = time.perf_counter() - start
        report, samples = evaluate_energy(
            energy, dataset, config, x_train=x_train, x_test=x_test, seed=args.seed
        )
        pcd_log_z = converged_log_partition(pcd_energy, dataset.bounds).log_z
        pcd_gap = nll(pcd_energy, x_test, pcd_log_z) - report.entropy_floor
        exact_gap = None
        if args.exact_reference:
            exact_energy, _ = train_energy_exact(x_train, config, bounds=dataset.bounds)
            log_z = converged_log_partition(exact_energy, dataset.bounds).log_z
            exact_gap = nll(exact_energy, x_test, log_z) - report.entropy_floor
        row = {
            "dataset": name,
            **dataclasses.asdict(report),
            "pcd_gap": pcd_gap,
            "train_seconds": train_seconds,
            "pcd_seconds": pcd_seconds,
            "steps": result.steps,
            "polish_steps": polish.steps,
            "recoveries": result.recoveries,
            "exact_reference_gap": exact_gap,
        }
        rows.append(row)
        values = [report.nll, report.entropy_floor, report.gap, pcd_gap, report.kde_nll, report.kde_gap]
        values += [exact_gap] if exact_gap is not None else []
        cells = "".join(f"{value:>10.4f}" for value in values)
        print(f"{name:<13}{cells}{report.mmd:>10.2e}{train_seconds:>9.1f}", flush=True)
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

    totals = summarise(rows)
    print(
        f"\nwithin {GAP_GOAL} nats of the floor: {totals['within_goal']}/{len(rows)}; "
        f"lower NLL than CV-KDE: {totals['beats_kde']}/{len(rows)}; "
        f"trained within {TIME_GOAL_SECONDS:.0f} s: {totals['within_time_goal']}/{len(rows)}; "
        f"median training time {totals['median_train_seconds']:.1f} s"
    )
    summary = {
        "rows": rows,
        **totals,
        "config": to_dict(config),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_report_json(args.json, summary)
    if args.figure is not None:
        save_figure(plot_density_grid(panels), args.figure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
