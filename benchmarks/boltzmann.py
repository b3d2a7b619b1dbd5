"""Boltzmann-machine benchmark (issue 7): AIS vs exact log Z, RBM test log-likelihoods, Gibbs vs Langevin.

Runs the pipeline's own stage functions on the ``images`` and ``boltzmann`` sections of a params file in a
work folder (prepare_images → train_rbm → evaluate_rbm → train_structured → evaluate_structured), plus an
AIS-vs-exact check on an RBM small enough to enumerate, and prints every figure beside its bar::

    python benchmarks/boltzmann.py --json reports/bench/boltzmann.json        # default: ≈ 20 min, 1 thread
    python benchmarks/boltzmann.py --json /tmp/b.json --steps 500 --n-temperatures 1000   # a short run
    python benchmarks/boltzmann.py --json /tmp/sm.json --full   # Salakhutdinov & Murray's scale: CD-25,
                                                                # 14,500 temperatures, 60,000 steps (hours)

Bars: AIS within 0.1 nats of the exact log Z of an enumerable RBM (784 visible, 20 hidden units, trained on
the binarised images). The 500-hidden-unit RBMs' AIS test log-likelihoods are reported with their standard
errors for CD-1, CD-k and PCD; the MNIST anchor (Salakhutdinov & Murray 2008: ≈ −125 nats for CD-1 and
≈ −86 for CD-25, 500 hidden units) applies with ``images.data.dataset: mnist`` and the MNIST files in
``images.data.local_copy``; Fashion-MNIST's figures differ and are reported as measured.
The structured task's table compares Gibbs sampling, annealed Gibbs + ICM, ICM and Langevin on the
continuous relaxation in accuracy, IoU, energy reached and wall time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch

from ebm.boltzmann.ais import RBMAISConfig, ais_log_partition
from ebm.boltzmann.rbm import exact_log_partition
from ebm.boltzmann.training import RBMRecipe, RBMTrainingConfig, train_rbm
from ebm.checkpoint import write_report_json
from ebm.config import load_params, to_dict
from ebm.stages.boltzmann import (
    BoltzmannParams,
    BoltzmannPaths,
    binary_images,
    evaluate_rbms,
    evaluate_structured,
    train_rbms,
    train_structured,
)
from ebm.stages.images import ImagePaths, ImagesParams, prepare

AIS_EXACT_BAR = 0.1  # nats
MNIST_ANCHOR = {"CD-1": -125.0, "CD-25": -86.0}


def with_overrides(params: BoltzmannParams, args: argparse.Namespace) -> BoltzmannParams:
    """The params with the command line's overrides (and ``--full``'s scale) applied."""
    rbm = params.rbm
    k = 25 if args.full and args.k is None else args.k
    variants = dict(rbm.variants)
    if k is not None:
        variants = {name: cd for name, cd in variants.items() if cd.persistent or cd.n_steps == 1}
        variants[f"cd{k}"] = RBMTrainingConfig(n_steps=k)
    steps = 60000 if args.full and args.steps is None else args.steps
    train = rbm.train if steps is None else dataclasses.replace(rbm.train, steps=steps)
    train = dataclasses.replace(train, progress=args.progress)
    ais = rbm.evaluation.ais
    n_temperatures = 14500 if args.full and args.n_temperatures is None else args.n_temperatures
    if n_temperatures is not None:
        ais = dataclasses.replace(ais, n_temperatures=n_temperatures)
    evaluation = dataclasses.replace(rbm.evaluation, ais=ais)
    if args.max_test is not None:
        evaluation = dataclasses.replace(evaluation, max_test=args.max_test)
    rbm = dataclasses.replace(rbm, variants=variants, train=train, evaluation=evaluation)
    structured = params.structured
    recipe = structured.recipe
    if args.structured_steps is not None:
        recipe = dataclasses.replace(
            recipe, train=dataclasses.replace(recipe.train, steps=args.structured_steps)
        )
    recipe = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, progress=args.progress))
    structured = dataclasses.replace(structured, recipe=recipe)
    return dataclasses.replace(params, rbm=rbm, structured=structured)


def ais_versus_exact(
    params: BoltzmannParams, paths: BoltzmannPaths, n_hidden: int, n_temperatures: int
) -> dict[str, Any]:
    """Train a small RBM (CD-1) on the binarised training images; compare AIS with exact enumeration."""
    data = binary_images(params, paths, "train")
    train = dataclasses.replace(params.rbm.train, steps=2000, progress=False, checkpoint_every=0)
    rbm, _ = train_rbm(data, RBMRecipe(n_hidden=n_hidden, cd=RBMTrainingConfig(n_steps=1), train=train))
    start = time.perf_counter()
    exact = exact_log_partition(rbm)
    exact_seconds = time.perf_counter() - start
    config = RBMAISConfig(n_chains=params.rbm.evaluation.ais.n_chains, n_temperatures=n_temperatures)
    start = time.perf_counter()
    ais = ais_log_partition(rbm, data, config, generator=torch.Generator().manual_seed(params.seed))
    return {
        "n_hidden": n_hidden,
        "exact_log_partition": exact,
        "exact_seconds": exact_seconds,
        "ais": dataclasses.asdict(ais),
        "ais_seconds": time.perf_counter() - start,
        "ais_minus_exact": ais.log_partition - exact,
        "max_abs_weight": float(rbm.weight.detach().abs().max()),
    }


def rbm_label(variant: dict[str, Any]) -> str:
    return f"PCD-{variant['k']}" if variant["persistent"] else f"CD-{variant['k']}"


def print_report(
    check: dict[str, Any],
    train: dict[str, Any],
    metrics: dict[str, Any],
    table: dict[str, Any],
    n_hidden: int,
) -> bool:
    """Print the three tables; return whether the AIS-vs-exact bar passed."""
    difference = check["ais_minus_exact"]
    passed = abs(difference) < AIS_EXACT_BAR
    print(
        f"\nAIS vs exact, RBM 784×{check['n_hidden']} (CD-1, max |W| = {check['max_abs_weight']:.2f}): "
        f"exact log Z = {check['exact_log_partition']:.4f}, AIS = {check['ais']['log_partition']:.4f} "
        f"± {check['ais']['standard_error']:.4f} → difference {difference:+.4f} nats "
        f"(bar: |·| < {AIS_EXACT_BAR}) {'pass' if passed else 'FAIL'}"
    )
    print(f"\n{metrics['dataset']}, {metrics['n_test']} test images, RBMs with {n_hidden} hidden units")
    header = f"{'model':<8} {'test LL ± SE (nats)':>22} {'train LL':>10} {'log Z (AIS) ± SE':>20} {'ESS':>6}"
    print(header + f" {'train min':>9} {'AIS s':>6}  MNIST anchor")
    for name, result in metrics.items():
        if not isinstance(result, dict):
            continue
        label = rbm_label(train[name])
        ais = result["ais"]
        anchor = MNIST_ANCHOR.get(label, "")
        print(
            f"{label:<8} {result['test_log_likelihood']:>13.2f} ± {result['test_log_likelihood_se']:<6.2f} "
            f"{result['train_log_likelihood']:>10.2f} "
            f"{ais['log_partition']:>12.2f} ± {ais['standard_error']:<5.2f} "
            f"{ais['effective_sample_size']:>6.1f} {train[name]['train_seconds'] / 60:>9.1f} "
            f"{result['ais_seconds']:>6.0f}  {anchor}"
        )
    print(f"\nstructured prediction: {table['dataset']}, {table['n_test']} test images")
    print(f"{'method':<38} {'accuracy':>9} {'IoU':>7} {'E(x, ŷ)':>10} {'seconds':>8} {'steps':>6}")
    for key in table["table_order"]:
        row = table["methods"][key]
        print(
            f"{row['method']:<38} {row['accuracy']:>9.4f} {row['iou']:>7.4f} {row['energy']:>10.1f} "
            f"{row['seconds']:>8.2f} {row['steps']:>6}"
        )
    return passed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file")
    parser.add_argument(
        "--root",
        type=Path,
        default=Path("reports/bench/boltzmann"),
        help="work folder for data, models, reports",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the figures as JSON here")
    parser.add_argument("--steps", type=int, default=None, help="RBM training steps (default: the params')")
    parser.add_argument(
        "--k", type=int, default=None, help="the CD-k variant's k (replaces the params' CD-k)"
    )
    parser.add_argument(
        "--n-temperatures", type=int, default=None, help="AIS temperatures (default: the params')"
    )
    parser.add_argument("--max-test", type=int, default=None, help="score at most this many test images")
    parser.add_argument("--structured-steps", type=int, default=None, help="grid CRF training steps")
    parser.add_argument("--exact-hidden", type=int, default=20, help="hidden units of the enumerable RBM")
    parser.add_argument("--full", action="store_true", help="Salakhutdinov & Murray's scale (hours on a CPU)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default %(default)s)")
    parser.add_argument("--progress", action="store_true", help="show training progress bars")
    args = parser.parse_args(argv)

    raw = load_params(args.params)
    params = with_overrides(BoltzmannParams.from_params(raw), args)
    torch.set_num_threads(args.threads)
    root = args.root.resolve()
    paths = BoltzmannPaths(root)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); dataset {params.dataset}; "
        f"RBM variants {json.dumps({k: to_dict(v) for k, v in params.rbm.variants.items()})}; "
        f"{params.rbm.train.steps} steps; AIS {params.rbm.evaluation.ais.n_temperatures} temperatures",
        flush=True,
    )
    seconds: dict[str, float] = {}

    def timed(name: str, stage: Any, *stage_args: Any) -> Any:
        start = time.perf_counter()
        result = stage(*stage_args)
        seconds[name] = time.perf_counter() - start
        print(f"{name}: {seconds[name]:.1f} s", flush=True)
        return result

    timed("prepare_images", prepare, ImagesParams.from_params(raw), ImagePaths(root))
    n_temperatures = params.rbm.evaluation.ais.n_temperatures
    check = timed("ais_vs_exact", ais_versus_exact, params, paths, args.exact_hidden, n_temperatures)
    train = timed("train_rbm", train_rbms, params, paths)
    metrics = timed("evaluate_rbm", evaluate_rbms, params, paths)
    structured_train = timed("train_structured", train_structured, params, paths)
    table = timed("evaluate_structured", evaluate_structured, params, paths)

    passed = print_report(check, train, metrics, table, params.rbm.n_hidden)
    print(f"\nfigures: {paths.reports / 'rbm_figures'}, {paths.reports / 'structured_figures'}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "ais_vs_exact": check | {"bar": f"|AIS − exact| < {AIS_EXACT_BAR}", "passed": passed},
            "rbm_train": train,
            "rbm_metrics": metrics,
            "structured_train": structured_train,
            "structured": table,
            "stage_seconds": seconds,
            "threads": torch.get_num_threads(),
            "rbm_train_config": to_dict(params.rbm.train),
            "mnist_anchor_nats": MNIST_ANCHOR,
        }
        write_report_json(args.json, payload)
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
