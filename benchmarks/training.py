"""Training speed: optimiser iterations per second of the 2D recipe and of an image step.

    python benchmarks/training.py --json reports/bench/training.json
    python benchmarks/training.py --quick      # fewer iterations

* **2D**: :func:`ebm.toy.train_energy` with the default :class:`~ebm.toy.Toy2DConfig` (MLP energy,
  PCD with MALA negatives, EMA) on 20,000 points of one toy dataset, timed over a few hundred
  iterations; the projection to the recipe's full run divides its step count by that rate.
* **image**: one JEM training iteration (:mod:`ebm.jem`: cross-entropy plus PCD with K Langevin
  steps) of the 28×28 CNN at batch 64 on random uint8 images, ``Trainer.train_step`` timed alone,
  with the energy contiguous and in ``channels_last``. Without :mod:`ebm.jem` it is a plain PCD
  step of :class:`~ebm.image_energies.ImageEnergy`. The sampler settings are the image recipe's
  (η = 1, σ = 0.01, per-chain gradient clip 0.1, chains clamped to [0, 1], K = 10).
* both at 1 intra-op thread and at all of the machine's, since small models on a shared two-core
  machine can run faster on one thread.

The load average is printed before and after; above ``BUSY_LOAD`` per core the figures are flagged as
preliminary.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ebm.data.toy2d import make_toy_dataset
from ebm.image_energies import CNN28, CNN28Config, ImageEnergy
from ebm.losses import ContrastiveDivergence
from ebm.samplers import Langevin, ReplayBuffer, UniformBox
from ebm.toy import Toy2DConfig, train_energy
from ebm.trainer import TrainConfig, Trainer

BUSY_LOAD = 0.25  # per core


def machine_threads() -> int:
    return len(os.sched_getaffinity(0))


def toy_iterations_per_s(steps: int, dataset: str) -> dict[str, Any]:
    config = Toy2DConfig()
    config = dataclasses.replace(
        config, train=dataclasses.replace(config.train, steps=steps, progress=False, checkpoint_every=0)
    )
    data = make_toy_dataset(dataset)
    x_train = data.sample(20_000, generator=torch.Generator().manual_seed(0))
    cpu = time.process_time()
    _, result = train_energy(x_train, config, bounds=data.bounds)
    cpu_seconds = time.process_time() - cpu  # includes the setup around fit(): an upper bound
    rate = result.steps / result.seconds
    recipe_steps = Toy2DConfig().train.steps
    return {
        "what": f"2D {dataset}, MLP {tuple(config.model.widths)}, batch {config.train.batch_size}, "
        f"{config.sampler.name} K={config.loss.n_steps}",
        "iterations": result.steps,
        "seconds": result.seconds,
        "cpu_seconds": cpu_seconds,
        "iterations_per_s": rate,
        "recipe_steps": recipe_steps,
        "projected_recipe_seconds": recipe_steps / rate,
    }


def image_objective(energy: ImageEnergy, generator: torch.Generator) -> tuple[Any, str]:
    sampler = Langevin(step_size=1.0, noise_scale=0.01, grad_clip=0.1, clamp=(0.0, 1.0))
    buffer = ReplayBuffer(10_000, UniformBox(energy.image_shape, 0.0, 1.0), generator=generator)
    cd = ContrastiveDivergence(sampler, n_steps=10, alpha=0.1, buffer=buffer)
    if importlib.util.find_spec("ebm.jem") is None:
        return cd, "PCD"
    from ebm.jem import JEMObjective

    return JEMObjective(cd), "JEM (CE + PCD)"


def image_iterations_per_s(steps: int, batch: int, *, channels_last: bool) -> dict[str, Any]:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        energy = ImageEnergy(CNN28(CNN28Config()), (1, 28, 28))
    if channels_last:
        energy = energy.to(memory_format=torch.channels_last)
    generator = torch.Generator().manual_seed(1)
    objective, kind = image_objective(energy, generator)
    images = torch.randint(0, 256, (2048, 1, 28, 28), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (2048,), generator=generator)
    data: Any = (images, labels) if kind.startswith("JEM") else images.float() / 255
    config = TrainConfig(
        steps=steps, batch_size=batch, lr=3e-4, ema_decay=0.999, checkpoint_every=0, progress=False
    )
    trainer = Trainer(energy, objective, data, config)
    trainer.train_step()  # warm-up: oneDNN primitives, the allocator
    cpu, start = time.process_time(), time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu
    return {
        "what": f"CNN28 {kind} train_step, batch {batch}, Langevin K=10"
        + (", channels_last" if channels_last else ""),
        "iterations": steps,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "iterations_per_s": steps / seconds,
    }


def anomaly_scoring_rows_per_s(rows: int) -> dict[str, Any] | None:
    """Rows/s of the anomaly detector's ``decision_function`` (preprocessing included), if it exists.

    The detector is the default :class:`~ebm.anomaly.detector.DetectorConfig` with each member trained
    for only a few steps: scoring costs the same whatever the weights.
    """
    try:
        from ebm.anomaly.detector import DetectorConfig, EnergyAnomalyDetector
    except ImportError:
        return None
    import numpy as np

    generator = np.random.default_rng(0)
    x_train = generator.standard_normal((5000, 30))
    x_score = generator.standard_normal((rows, 30))
    detector = EnergyAnomalyDetector(train=dataclasses.replace(DetectorConfig().train, steps=5))
    detector.fit(x_train)
    detector.decision_function(x_score[:1000])  # warm-up
    start = time.perf_counter()
    detector.decision_function(x_score)
    seconds = time.perf_counter() - start
    return {
        "what": f"EnergyAnomalyDetector.decision_function, 30 numeric features, "
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
    parser.add_argument("--dataset", default="moons")
    parser.add_argument(
        "--threads", nargs="+", type=int, default=None, help="intra-op thread counts (default: 1 and all)"
    )
    args = parser.parse_args(argv)
    threads = machine_threads()
    cores = os.cpu_count() or 1
    load_start = os.getloadavg()
    print(
        f"torch {torch.__version__}; {cores} cores, affinity {threads}; "
        f"load average at start {' '.join(f'{v:.2f}' for v in load_start)}"
    )
    busy = load_start[0] > BUSY_LOAD * cores
    if busy:
        print(f"WARNING: machine busy (load {load_start[0]:.2f}); figures are preliminary", file=sys.stderr)
    thread_counts = sorted(set(args.threads or (1, threads)))
    toy_steps, image_steps = (60, 6) if args.quick else (300, 30)
    rows: list[dict[str, Any]] = []
    for n in thread_counts:
        rows.append(with_threads(n, lambda: toy_iterations_per_s(toy_steps, args.dataset)))
        for channels_last in (False, True):
            rows.append(
                with_threads(
                    n, functools.partial(image_iterations_per_s, image_steps, 64, channels_last=channels_last)
                )
            )
    print(f"\n{'threads':>7}  {'iterations/s':>12}  {'seconds':>8}  {'cpu share':>9}  what")
    for row in rows:
        share = row["cpu_seconds"] / (row["seconds"] * row["threads"])
        print(
            f"{row['threads']:>7}  {row['iterations_per_s']:>12.2f}  {row['seconds']:>8.2f}  {share:>9.2f}  "
            f"{row['what']}"
        )
        if "projected_recipe_seconds" in row:
            print(
                f"{'':>7}  {'':>12}  {'':>8}  {'':>9}  → the recipe's {row['recipe_steps']} steps: "
                f"~{row['projected_recipe_seconds']:.0f} s"
            )
    anomaly: list[dict[str, Any]] = []
    for n in thread_counts:
        previous = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            scored = anomaly_scoring_rows_per_s(100_000)
        finally:
            torch.set_num_threads(previous)
        if scored is None:
            print("\nanomaly detector scoring: ebm.anomaly.detector is not available in this checkout")
            break
        anomaly.append({"threads": n, **scored})
        print(
            f"\nanomaly detector scoring, {n} thread(s): {scored['rows_per_s']:.3g} rows/s ({scored['what']})"
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
        args.json.write_text(
            json.dumps(
                {
                    "load_average_start": load_start,
                    "load_average_end": load_end,
                    "warnings": warnings,
                    "rows": rows,
                    "anomaly_scoring": anomaly,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
