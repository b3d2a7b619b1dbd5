"""Training speed: iterations per second of the 2D, image and anomaly recipes, and the time each takes
to reach its quality bar.

    python benchmarks/training.py --json reports/bench/training.json
    python benchmarks/training.py --quick      # fewer iterations; no time-to-bar runs
    python benchmarks/training.py --quick --device cuda   # the step rates on a GPU

* **2D**: :func:`ebm.toy.train_energy` with the default :class:`~ebm.toy.Toy2DConfig` (MLP energy,
  PCD with MALA negatives, EMA) on 20,000 points of one toy dataset (``--dataset``, the training and
  test seeds of ``benchmarks/toy_density.py``), timed over a few hundred iterations. **Time to bar**:
  the whole recipe, the EMA model's exact-grid test NLL gap to the entropy floor measured every
  ``--every`` steps (outside the clock), and the training seconds at which it first falls within
  0.02 nats (issue 2's bar).
* **image**: the default JEM recipe of ``params.yaml`` (``images``: CNN28, cross-entropy plus PCD,
  its sampler, batch and generative batch) on the real Fashion-MNIST training split, read from the
  local copy of the original files the params name (``make data`` installs Debian's).
  ``Trainer.train_step`` is timed alone; the recipe's full run is that rate times its steps, and its
  end is where ``benchmarks/images.py`` measures the image bars (accuracy ≥ 90 % and the rest).
* **anomaly**: the default :class:`~ebm.anomaly.detector.EnergyAnomalyDetector` on the synthetic
  card transactions (``TransactionsConfig()``, split in time as ``benchmarks/anomaly.py`` does).
  **Time to bar**: the marginal model alone, then the whole detector fitted with 5, 25, 100 and 200
  (the default) steps per member; the first whose test AUROC and AUPRC reach the best baseline's
  (IsolationForest, ECOD, LOF: issue 4's bar). Also the default detector's scoring rows/s on the test
  period's rows.
* iterations/s at 1 intra-op thread and at all of the machine's, since small models on a shared
  two-core machine can run faster on one thread; time-to-bar runs at all of them.
* ``--device cuda`` times the 2D and image steps on the GPU instead (the image energy under bf16
  autocast, as the images stage trains it there); the time-to-bar runs stay on the CPU.

The load average is printed before and after; above ``BUSY_LOAD`` per core the figures are flagged as
preliminary.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import toy_density

from ebm.checkpoint import write_report_json
from ebm.config import load_params, whole_number
from ebm.data.images import load_original, split_original
from ebm.data.toy2d import TOY_DATASETS
from ebm.evaluation.density2d import converged_log_partition, nll
from ebm.images import buffer_proposal, build_objective, make_energy
from ebm.stages.images import ImagesParams
from ebm.toy import Toy2DConfig, train_energy
from ebm.trainer import Trainer

BUSY_LOAD = 0.25  # per core
TOY_BAR_NATS = 0.02  # issue 2: exact-grid test NLL within 0.02 nats of the entropy floor
ANOMALY_STEPS = (0, 5, 25, 100, 200)  # steps per member; 0: the marginal model alone (no members)


def meets_bar(auroc: float, auprc: float, best: dict[str, float]) -> bool:
    """Both figures at least the best baseline's (``best``: ``{"auroc": …, "auprc": …}``)."""
    return auroc >= best["auroc"] and auprc >= best["auprc"]


def machine_threads() -> int:
    return len(os.sched_getaffinity(0))


def toy_split(dataset: str) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """The dataset and its training and test points, as ``benchmarks/toy_density.py``'s default run
    draws them."""
    return toy_density.draw(dataset, 20_000, 20_000, seed=0)


def toy_config(steps: int | None = None, device: str = "cpu", *, every: int | None = None) -> Toy2DConfig:
    """The default 2D recipe, without progress bar or checkpoints. ``every``: the trainer's callbacks
    fire at log steps only, so ``log_every`` becomes ``gcd(log_every, every)`` for a callback every
    ``every`` steps (the default 500 keeps 50; logging records metrics and does not change training)."""
    config = Toy2DConfig()
    log_every = config.train.log_every if every is None else math.gcd(config.train.log_every, every)
    train = dataclasses.replace(
        config.train,
        steps=steps or config.train.steps,
        progress=False,
        checkpoint_every=0,
        device=device,
        log_every=log_every,
    )
    return dataclasses.replace(config, train=train)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a clock read afterwards times it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def toy_iterations_per_s(steps: int, dataset: str, device: torch.device) -> dict[str, Any]:
    """PCD's training steps per second: the polish after it (exact likelihood) is left out."""
    config = toy_config(steps, str(device))
    config = dataclasses.replace(config, polish=dataclasses.replace(config.polish, steps=0))
    data, x_train, _ = toy_split(dataset)
    cpu = time.process_time()
    _, result = train_energy(x_train, config, bounds=data.bounds)  # ends on a host sync: the last metrics
    cpu_seconds = time.process_time() - cpu  # includes the setup around fit(): an upper bound
    rate = result.steps / result.seconds
    recipe_steps = Toy2DConfig().train.steps
    return {
        "what": f"{device.type}: 2D {dataset}, MLP {tuple(config.model.widths)}, "
        f"batch {config.train.batch_size}, {config.sampler.name} K={config.loss.n_steps}",
        "iterations": result.steps,
        "seconds": result.seconds,
        "cpu_seconds": cpu_seconds,
        "iterations_per_s": rate,
        "recipe_steps": recipe_steps,
        "projected_recipe_seconds": recipe_steps / rate,
    }


def toy_time_to_bar(dataset: str, every: int) -> dict[str, Any]:
    """The default 2D recipe on ``dataset``, its EMA model's exact test NLL gap every ``every`` steps,
    then the polishing copy's (:func:`ebm.toy.polish_energy`), its steps counted on from PCD's.

    The gap is measured inside a trainer callback; the time it takes is taken off the training clock.
    """
    config = toy_config(every=every)  # log steps fall on every multiple of ``every``
    data, x_train, x_test = toy_split(dataset)
    floor = -float(data.log_prob(x_test).mean())
    curve: list[dict[str, float]] = []
    evaluating = 0.0
    start = time.perf_counter()

    def gap_of(energy: torch.nn.Module) -> float:
        with torch.no_grad():
            log_z = converged_log_partition(energy, data.bounds).log_z
            return nll(energy, x_test, log_z) - floor

    def measure(trainer: Trainer, step: int, _metrics: dict[str, float]) -> None:
        nonlocal evaluating
        # called at log steps: ``step`` steps done, the last counted from 0 a multiple of log_every, which
        # divides ``every``
        if step == 1 or (step - 1) % every:
            return
        clock = time.perf_counter()
        curve.append(
            {"step": step, "train_seconds": clock - start - evaluating, "gap": gap_of(trainer.model)}
        )
        evaluating += time.perf_counter() - clock

    energy, result = train_energy(x_train, config, bounds=data.bounds, callbacks=[measure])
    train_seconds = time.perf_counter() - start - evaluating
    # the polish's steps count on from PCD's (its callbacks see the polishing copy as trainer.model)
    steps = result.steps + (result.polish.steps if result.polish is not None else 0)
    if not curve or curve[-1]["step"] != steps:
        curve.append({"step": steps, "train_seconds": train_seconds, "gap": gap_of(energy)})
    reached = next((point for point in curve if point["gap"] <= TOY_BAR_NATS), None)
    return {
        "dataset": dataset,
        "recipe_steps": steps,
        "recipe_seconds": train_seconds,
        "bar_nats": TOY_BAR_NATS,
        "final_gap": curve[-1]["gap"],
        "steps_to_bar": None if reached is None else reached["step"],
        "seconds_to_bar": None if reached is None else reached["train_seconds"],
        "curve": curve,
    }


def image_iterations_per_s(steps: int, params_path: Path, device: torch.device) -> dict[str, Any]:
    """``Trainer.train_step`` of the params' JEM recipe on the real training split, on ``device``."""
    params = ImagesParams.from_params(load_params(params_path))
    original = load_original(params.data)  # ImageDataUnavailableError names what is missing and where
    split = split_original(original, params.data, seed=params.seed)["train"]
    spec, recipe = params.spec(), params.recipe
    energy = make_energy(spec, device=device, seed=recipe.train.seed)
    objective = build_objective(
        recipe,
        spec.image_shape,
        device=device,
        generator=torch.Generator(device).manual_seed(recipe.train.seed + 1),
        proposal=buffer_proposal(recipe, spec.image_shape, split.images, split.labels),
    )
    config = dataclasses.replace(recipe.train, device=str(device), checkpoint_every=0, progress=False)
    trainer = Trainer(energy, objective, (split.images, split.labels), config)
    for _ in range(3 if device.type == "cuda" else 1):  # warm-up: oneDNN primitives / cuDNN, the allocator
        trainer.train_step()
    synchronize(device)
    cpu, start = time.process_time(), time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    synchronize(device)
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu
    rate = steps / seconds
    return {
        "what": f"{device.type}: {params.data.dataset} JEM {recipe.model.architecture} train_step, batch "
        f"{config.batch_size} (generative {recipe.jem.generative_batch}), {recipe.sampler.name} "
        f"K={recipe.loss.n_steps}",
        "iterations": steps,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "iterations_per_s": rate,
        "recipe_steps": recipe.train.steps,
        "projected_recipe_seconds": recipe.train.steps / rate,
    }


@functools.cache
def anomaly_data() -> tuple[Any, Any, Any]:
    """Training and test features and test labels of the synthetic transactions, split in time (drawn
    once per process: the time-to-bar fits and the scoring share them)."""
    from ebm.anomaly import transactions

    table = transactions.generate_transactions(transactions.TransactionsConfig())
    train, test = transactions.split_by_time(table)
    return train[transactions.FEATURES], test[transactions.FEATURES], test[transactions.LABEL].to_numpy()


def anomaly_time_to_bar(step_counts: tuple[int, ...]) -> dict[str, Any]:
    """The detector fitted with each of ``step_counts`` steps per member (0: no members, the marginal model
    alone), against the best baseline.

    Both sides are timed over the same span, fitting on the training rows and scoring the test rows
    (``fit_score_seconds``; the metrics are computed off the clock); the detector's fit alone is
    ``fit_seconds`` too (a baseline's ``fit_score`` does both in one call). The time to bar is the fit's.
    """
    from ebm.anomaly.baselines import BASELINES, fit_score
    from ebm.anomaly.detector import DetectorConfig, EnergyAnomalyDetector
    from ebm.anomaly.metrics import detection_metrics

    train, test, labels = anomaly_data()
    baselines = {}
    for name in BASELINES:
        start = time.perf_counter()
        scores = fit_score(name, train, test, seed=0)  # fits and scores in one call: timed as one span
        fit_score_seconds = time.perf_counter() - start
        metrics = detection_metrics(labels, scores)
        baselines[name] = {
            "auroc": metrics.auroc,
            "auprc": metrics.auprc,
            "fit_score_seconds": fit_score_seconds,
        }
    best = {m: max(b[m] for b in baselines.values()) for m in ("auroc", "auprc")}
    rows = []
    for steps in step_counts:
        config = DetectorConfig()
        if steps == 0:
            config = dataclasses.replace(config, n_members=0)
        else:
            config = dataclasses.replace(config, train=dataclasses.replace(config.train, steps=steps))
        detector = EnergyAnomalyDetector(config, seed=0)
        start = time.perf_counter()
        detector.fit(train)
        seconds = time.perf_counter() - start
        scores = detector.decision_function(test)
        fit_score_seconds = time.perf_counter() - start  # the baselines' span: fit, then score the test rows
        metrics = detection_metrics(labels, scores)
        rows.append(
            {
                "steps": steps,
                "fit_seconds": seconds,
                "fit_score_seconds": fit_score_seconds,
                "members": detector.config.n_members,
                "member_iterations_per_s": steps * detector.config.n_members / seconds,
                "auroc": metrics.auroc,
                "auprc": metrics.auprc,
                "meets_bar": meets_bar(metrics.auroc, metrics.auprc, best),
            }
        )
    reached = next((row for row in rows if row["meets_bar"]), None)
    return {
        "rows_train": len(train),
        "rows_test": len(test),
        "baselines": baselines,
        "best_baseline": best,
        "fits": rows,
        "steps_to_bar": None if reached is None else reached["steps"],
        "seconds_to_bar": None if reached is None else reached["fit_seconds"],
    }


def fitted_detector() -> Any:
    """The default detector fitted on the synthetic transactions' training period."""
    from ebm.anomaly.detector import EnergyAnomalyDetector

    return EnergyAnomalyDetector(seed=0).fit(anomaly_data()[0])


def anomaly_scoring_rows_per_s(detector: Any, rows: int) -> dict[str, Any]:
    """Rows/s of ``detector.decision_function`` (preprocessing included) on the synthetic transactions'
    test period, repeated to ``rows`` rows."""
    import pandas as pd

    _, test, _ = anomaly_data()
    score = pd.concat([test] * -(-rows // len(test)), ignore_index=True).iloc[:rows]
    detector.decision_function(score.iloc[:1000])  # warm-up
    start = time.perf_counter()
    detector.decision_function(score)
    seconds = time.perf_counter() - start
    return {
        "what": f"EnergyAnomalyDetector.decision_function on transactions ({test.shape[1]} columns), "
        f"{detector.config.n_members} members {tuple(detector.config.widths)}",
        "rows": rows,
        "rows_per_s": rows / seconds,
    }


def with_threads(threads: int, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return {"threads": threads, **run()}
    finally:
        torch.set_num_threads(previous)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--dataset", default="moons", choices=list(TOY_DATASETS))
    parser.add_argument(
        "--every",
        type=int,
        default=500,
        help="2D time to bar: steps between gaps (log_every becomes gcd(log_every, every): each is measured)",
    )
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="its images section")
    parser.add_argument(
        "--threads",
        nargs="+",
        type=whole_number(1),
        default=None,
        help="intra-op thread counts (default: 1 and all)",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        choices=("cpu", "cuda"),
        help="where the iterations/s rows run (the time-to-bar runs stay on the CPU)",
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device on this machine")
    if args.every < 1:
        parser.error(f"--every must be a positive number of steps, got {args.every}")
    threads = machine_threads()
    cores = os.cpu_count() or 1
    load_start = os.getloadavg()
    gpu = f"; {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    print(
        f"torch {torch.__version__}{gpu}; {cores} cores, affinity {threads}; "
        f"load average at start {' '.join(f'{v:.2f}' for v in load_start)}"
    )
    busy = load_start[0] > BUSY_LOAD * cores
    if busy:
        print(f"WARNING: machine busy (load {load_start[0]:.2f}); figures are preliminary", file=sys.stderr)
    thread_counts = sorted(set(args.threads or (1, threads)))
    toy_steps, image_steps = (60, 4) if args.quick and device.type == "cpu" else (300, 20)
    rows: list[dict[str, Any]] = []
    for n in thread_counts:
        rows.append(with_threads(n, lambda: toy_iterations_per_s(toy_steps, args.dataset, device)))
        rows.append(with_threads(n, lambda: image_iterations_per_s(image_steps, args.params, device)))
    print(f"\n{'threads':>7}  {'iterations/s':>12}  {'seconds':>8}  {'cpu share':>9}  what")
    for row in rows:
        share = row["cpu_seconds"] / (row["seconds"] * row["threads"])
        print(
            f"{row['threads']:>7}  {row['iterations_per_s']:>12.2f}  {row['seconds']:>8.2f}  {share:>9.2f}  "
            f"{row['what']}"
        )
        print(
            f"{'':>7}  {'':>12}  {'':>8}  {'':>9}  → the recipe's {row['recipe_steps']} steps: "
            f"~{row['projected_recipe_seconds']:.0f} s"
        )
    results: dict[str, Any] = {"rows": rows}
    if not args.quick:
        toy = with_threads(threads, lambda: toy_time_to_bar(args.dataset, args.every))
        results["toy_time_to_bar"] = toy
        print(
            f"\n2D time to bar ({args.dataset}, default recipe, {threads} thread(s)): "
            "gap to the floor by step"
        )
        print(f"{'step':>6}  {'train s':>8}  {'gap (nats)':>10}")
        for point in toy["curve"]:
            print(f"{point['step']:>6}  {point['train_seconds']:>8.1f}  {point['gap']:>10.4f}")
        print(
            f"within {TOY_BAR_NATS} nats "
            + (
                f"at step {toy['steps_to_bar']}, {toy['seconds_to_bar']:.0f} s"
                if toy["steps_to_bar"] is not None
                else "at no measured step"
            )
            + f"; the recipe's {toy['recipe_steps']} steps took {toy['recipe_seconds']:.0f} s "
            f"(gap {toy['final_gap']:.4f})"
        )
        anomaly = with_threads(threads, lambda: anomaly_time_to_bar(ANOMALY_STEPS))
        results["anomaly_time_to_bar"] = anomaly
        print(
            f"\nanomaly detector time to bar (synthetic transactions, {anomaly['rows_train']} training rows, "
            f"{threads} thread(s)); baselines: "
            + ", ".join(
                f"{name} AUROC {b['auroc']:.4f} AUPRC {b['auprc']:.3f} "
                f"(fit + score test {b['fit_score_seconds']:.1f} s)"
                for name, b in anomaly["baselines"].items()
            )
        )
        print(
            f"{'steps per member':>16}  {'fit s':>6}  {'fit + score test s':>18}  {'member it/s':>11}  "
            f"{'AUROC':>7}  {'AUPRC':>6}  ≥ best baseline  (member it/s: members × steps over the whole fit, "
            "marginals included)"
        )
        for fit in anomaly["fits"]:
            steps = f"{fit['steps']} × {fit['members']}" if fit["members"] else "marginals only"
            rate = f"{fit['member_iterations_per_s']:.1f}" if fit["members"] else "-"
            print(
                f"{steps:>16}  {fit['fit_seconds']:>6.1f}  {fit['fit_score_seconds']:>18.1f}  {rate:>11}  "
                f"{fit['auroc']:>7.4f}  {fit['auprc']:>6.3f}  {fit['meets_bar']}"
            )
        print(
            "bar reached "
            + (
                f"at {anomaly['steps_to_bar']} steps per member (0: the marginals alone), "
                f"fit {anomaly['seconds_to_bar']:.1f} s"
                if anomaly["steps_to_bar"] is not None
                else "by none of these"
            )
        )
    detector = fitted_detector()  # once: the fitted state does not depend on the thread count
    scoring = results["anomaly_scoring"] = [
        with_threads(n, lambda: anomaly_scoring_rows_per_s(detector, 100_000)) for n in thread_counts
    ]
    for scored in scoring:
        print(
            f"\nanomaly detector scoring, {scored['threads']} thread(s): {scored['rows_per_s']:.3g} rows/s "
            f"({scored['what']})"
        )
    load_end = os.getloadavg()
    print(f"load average at end {' '.join(f'{v:.2f}' for v in load_end)}")
    warnings = []
    if busy:
        warnings.append(f"machine busy before the run (load {load_start[0]:.2f} on {cores} cores)")
    if load_end[0] > threads + BUSY_LOAD * cores + 0.5:
        warnings.append(f"other work ran during the run (load {load_end[0]:.2f})")
    for note in warnings:
        print(f"WARNING: {note}; figures are preliminary, rerun on a quiet machine", file=sys.stderr)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"load_average_start": load_start, "load_average_end": load_end, "warnings": warnings}
        write_report_json(args.json, {**payload, **results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
