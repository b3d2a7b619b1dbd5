"""Image EBM benchmark (issue 3): the JEM energy's figures next to their bars, one run, default params.

Runs the pipeline's own stage functions (prepare → train → evaluate → render) on the ``images`` section
of a params file in a work folder, then prints every figure beside its bar::

    python benchmarks/images.py --json reports/bench/images.json
    python benchmarks/images.py --json /tmp/short.json --steps 600 --classifier-steps 300   # a short run
    python benchmarks/images.py --root . --reuse --json reports/bench/images.json   # after `make pipeline`

Bars (Fashion-MNIST, default params, 2 CPU cores): test accuracy ≥ 90 %; OOD AUROC ≥ 0.999 vs uniform
noise, ≥ 0.99 vs inverted images, ≥ 0.95 vs another digit-like set (scikit-learn's digits); training
≤ 45 min. The Fréchet distance of samples is reported next to the floor of held-out real images, and the
AUROC of every OOD score (energy, max-softmax, gradient norm, input complexity, typicality and its
class-conditional form) against every OOD set (including patches of natural photographs, a real set the
bars do not name) is printed so the "simpler images get lower energy" trap is visible rather than
averaged away.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ebm.checkpoint import write_report_json
from ebm.config import load_params, to_dict, whole_number
from ebm.stages.images import ImagePaths, ImagesParams, evaluate, prepare, render, train

BARS = {
    "accuracy": 0.90,
    "auroc_uniform_noise": 0.999,
    "auroc_inverted": 0.99,
    "auroc_sklearn_digits": 0.95,
    "train_minutes": 45.0,
}


def with_overrides(params: ImagesParams, args: argparse.Namespace) -> ImagesParams:
    recipe = params.recipe
    if args.steps is not None:
        recipe = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, steps=args.steps))
    if args.ema_decay is not None:
        recipe = dataclasses.replace(
            recipe, train=dataclasses.replace(recipe.train, ema_decay=args.ema_decay)
        )
    recipe = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, progress=args.progress))
    classifier = params.classifier
    if args.classifier_steps is not None:
        classifier = dataclasses.replace(classifier, steps=args.classifier_steps)
    evaluation = params.evaluation
    if args.n_buffer_samples is not None:
        evaluation = dataclasses.replace(evaluation, n_buffer_samples=args.n_buffer_samples)
    if args.max_test is not None:
        evaluation = dataclasses.replace(evaluation, max_test=args.max_test)
    return dataclasses.replace(params, recipe=recipe, classifier=classifier, evaluation=evaluation)


def figures(metrics: dict[str, Any], train_metrics: dict[str, float]) -> list[tuple[str, str, str, str]]:
    """Rows of (figure, value, bar, verdict)."""
    auroc = metrics["ood_auroc"]
    train_minutes = train_metrics["train_seconds"] / 60

    def row(name: str, value: float, bar_key: str | None, fmt: str = "{:.4f}", higher: bool = True) -> tuple:
        if bar_key is None:
            return (name, fmt.format(value), "", "")
        bar = BARS[bar_key]
        ok = value >= bar if higher else value <= bar
        return (
            name,
            fmt.format(value),
            ("≥ " if higher else "≤ ") + fmt.format(bar),
            "pass" if ok else "FAIL",
        )

    ais = metrics["ais"]
    restoration = metrics["restoration"]
    return [
        row("JEM test accuracy", metrics["accuracy"], "accuracy"),
        row("plain classifier test accuracy (FD features)", metrics["classifier_accuracy"], None),
        row(
            f"AUROC vs uniform noise ({metrics['ood_score']})", auroc["uniform_noise"], "auroc_uniform_noise"
        ),
        row(f"AUROC vs inverted ({metrics['ood_score']})", auroc["inverted"], "auroc_inverted"),
        row(
            f"AUROC vs sklearn digits ({metrics['ood_score']})",
            auroc["sklearn_digits"],
            "auroc_sklearn_digits",
        ),
        row(f"AUROC vs horizontal flip ({metrics['ood_score']})", auroc["hflip"], None),
        row(f"AUROC vs vertical flip ({metrics['ood_score']})", auroc["vflip"], None),
        row(f"AUROC vs photo patches ({metrics['ood_score']})", auroc["photo_patches"], None),
        row(
            f"FD, {metrics['n_buffer_samples']} buffer samples", metrics["fd_buffer_samples"], None, "{:.3f}"
        ),
        row(
            f"FD, {metrics['n_fd_matched']} buffer samples",
            metrics["fd_buffer_samples_matched"],
            None,
            "{:.3f}",
        ),
        row(
            f"FD floor, {metrics['n_fd_matched']} held-out real images",
            metrics["fd_real_floor"],
            None,
            "{:.3f}",
        ),
        row(
            f"FD, {metrics['n_noise_samples']} samples from noise",
            metrics["fd_noise_samples"],
            None,
            "{:.3f}",
        ),
        row(
            f"FD, {metrics['n_noise_samples']} samples from the buffer's proposal",
            metrics["fd_proposal_samples"],
            None,
            "{:.3f}",
        ),
        row("FD of the proposal's own draws (no EBM)", metrics["fd_proposal_draws"], None, "{:.3f}"),
        row(
            f"FD floor, {metrics['n_fd_small']} held-out real images",
            metrics["fd_real_floor_small"],
            None,
            "{:.3f}",
        ),
        (
            "AIS log Z ± SE (ESS)",
            f"{ais['log_partition']:.1f} ± {ais['standard_error']:.2f} ({ais['effective_sample_size']:.1f})",
            "",
            "",
        ),
        row(
            "test bits/dim (AIS; optimistic in expectation)", metrics["test_bits_per_dim_ais"], None, "{:.3f}"
        ),
        (
            "inpainting PSNR before → after (dB)",
            f"{restoration['inpaint_psnr_before']:.2f} → {restoration['inpaint_psnr_after']:.2f}",
            "",
            "",
        ),
        (
            "denoising PSNR before → after (dB)",
            f"{restoration['denoise_psnr_before']:.2f} → {restoration['denoise_psnr_after']:.2f}",
            "",
            "",
        ),
        row("training minutes (JEM)", train_minutes, "train_minutes", "{:.1f}", higher=False),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--params", type=Path, default=Path("params.yaml"), help="params file (its images section)"
    )
    parser.add_argument(
        "--root",
        type=Path,
        default=Path("reports/bench/images"),
        help="work folder for data, models, reports",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the figures as JSON here")
    parser.add_argument("--steps", type=whole_number(1), default=None, help="override JEM training steps")
    parser.add_argument("--ema-decay", type=float, default=None, help="override the EMA decay (short runs)")
    parser.add_argument(
        "--classifier-steps", type=whole_number(1), default=None, help="override the FD classifier's steps"
    )
    parser.add_argument(
        "--n-buffer-samples", type=whole_number(2), default=None, help="override the FD sample count"
    )
    parser.add_argument(
        "--max-test", type=whole_number(2), default=None, help="evaluate on at most this many test images"
    )
    parser.add_argument("--threads", type=whole_number(1), default=None, help="torch intra-op threads")
    parser.add_argument("--progress", action="store_true", help="show the training progress bar")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="print the figures of the stages already run under --root (after `make pipeline`: --root .)",
    )
    args = parser.parse_args(argv)
    overrides = ("steps", "ema_decay", "classifier_steps", "n_buffer_samples", "max_test")
    given = [f"--{name.replace('_', '-')}" for name in overrides if getattr(args, name) is not None]
    if args.reuse and given:  # the figures would come from the earlier run, beside a recipe it never used
        parser.error(f"--reuse prints the figures of stages already run; it takes no {', '.join(given)}")

    params = with_overrides(ImagesParams.from_params(load_params(args.params)), args)
    threads = args.threads or params.threads
    if threads is not None:
        torch.set_num_threads(threads)
    paths = ImagePaths(args.root.resolve())
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"recipe: {json.dumps(to_dict(params.recipe))}"
    )
    seconds: dict[str, float] = {}
    stages = (("prepare", prepare), ("train", train), ("evaluate", evaluate), ("render", render))
    for name, stage in () if args.reuse else stages:
        start = time.perf_counter()
        stage(params, paths)
        seconds[name] = time.perf_counter() - start
        print(f"{name}: {seconds[name]:.1f} s", flush=True)
    if args.reuse and not (paths.reports / "metrics.json").is_file():
        parser.error(f"--reuse: no {paths.reports / 'metrics.json'}; run the image stages there first")
    metrics = json.loads((paths.reports / "metrics.json").read_text())
    train_metrics = json.loads((paths.reports / "train.json").read_text())

    rows = figures(metrics, train_metrics)
    width = max(len(r[0]) for r in rows)
    print(f"\n{'figure':<{width}}  {'value':>22}  {'bar':>10}  verdict")
    for name, value, bar, verdict in rows:
        print(f"{name:<{width}}  {value:>22}  {bar:>10}  {verdict}")
    print("\nOOD AUROC by score (rows) and OOD set (columns):")
    sets = list(next(iter(metrics["ood_auroc_by_score"].values())))
    print(f"{'score':<18}" + "".join(f"{s:>16}" for s in sets))
    for score, row in metrics["ood_auroc_by_score"].items():
        print(f"{score:<18}" + "".join(f"{row[s]:>16.4f}" for s in sets))
    trap = metrics["energy_trap"]
    lower = "digits LOWER than test data" if trap["digits_lower_than_test"] else "digits higher"
    print(
        f"\nenergy trap: mean E(test) = {trap['mean_energy_test']:.3f}, "
        f"mean E(sklearn digits) = {trap['mean_energy_sklearn_digits']:.3f} ({lower})"
    )
    print(f"figures: {paths.reports / 'figures'}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "figures": [dict(zip(("figure", "value", "bar", "verdict"), r, strict=True)) for r in rows],
            "metrics": metrics,
            "train": train_metrics,
            "stage_seconds": seconds,
            "threads": torch.get_num_threads(),
            "recipe": to_dict(params.recipe),
        }
        write_report_json(args.json, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
