"""The ``ebm`` command line.

::

    ebm toy train --dataset moons --out models/moons.pt      # train a 2D energy (defaults: the 2D recipe)
    ebm toy evaluate --dataset moons --model models/moons.pt # exact-grid NLL, gap, MMD, KDE baseline
    ebm toy render --dataset moons --model models/moons.pt --out moons.png
    ebm toy classify --dataset moons --out moons-decision.png
    ebm pipeline                                             # the whole DVC pipeline through Prefect
    ebm anomaly generate --out data/anomaly/transactions.parquet   # synthetic transactions with fraud
    ebm anomaly fit --data data/anomaly/train.parquet --out models/anomaly/detector.pt
    ebm anomaly evaluate --model models/anomaly/detector.pt --data data/anomaly/test.parquet --label is_fraud
    ebm score --model models/anomaly/detector.pt --input new.csv --output scored.csv
    ebm rbm loglik --model models/boltzmann/rbm/cd1.pt       # AIS (and exact) log Z, test log-likelihood

``ebm <command> --help`` explains every option and states its default; only the files a command reads
(``--model``, ``--data``, ``--input``) and ``score --output`` must be given.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ebm.runtime import configure_openmp

configure_openmp()  # the `ebm` command's process, before the imports below load torch (ebm.runtime)

from ebm.config import whole_number  # noqa: E402
from ebm.data.toy2d import TOY_DATASETS, make_toy_dataset  # noqa: E402

_positive_int = whole_number(1)
_non_negative_int = whole_number(0)  # --top-k 0: no reasons


def _output_file(text: str) -> Path:
    """An argparse ``type`` for a file to write: refused before any work when it is a folder, or when a
    folder on its way is a file (else training ran to the end and then failed to save)."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give the path of a file to write")
    for folder in path.parents:
        if folder.exists():
            if not folder.is_dir():
                raise argparse.ArgumentTypeError(f"{folder} is a file, so {text} cannot be written under it")
            break
    return path


def _toy_recipe(args: argparse.Namespace) -> Any:
    from ebm.config import from_dict, load_params
    from ebm.samplers import SamplerConfig
    from ebm.stages.common import read_mapping
    from ebm.toy import Toy2DConfig

    config = Toy2DConfig()
    if args.params is not None:
        toy = read_mapping(load_params(args.params), "toy")
        for key in ("datasets", "n_train", "n_test"):
            toy.pop(key, None)
        config = from_dict(Toy2DConfig, toy, "toy")
    overrides = (("steps", getattr(args, "steps", None)), ("seed", args.seed), ("device", args.device))
    train = dataclasses.replace(config.train, **{k: v for k, v in overrides if v is not None})
    sampler = config.sampler
    if args.sampler == "langevin" and sampler.jump_every is not None:
        # The recipe's mode jumps are Metropolis moves, MALA's only: plain Langevin runs without them.
        sampler = dataclasses.replace(
            sampler,
            jump_every=None,
            jump_grid_bins=None,
            jump_uniform_weight=SamplerConfig().jump_uniform_weight,
        )
    sampler = dataclasses.replace(
        sampler,
        **{k: v for k, v in (("name", args.sampler), ("step_size", args.step_size)) if v is not None},
    )
    polish_steps = getattr(args, "polish_steps", None)
    polish = config.polish if polish_steps is None else dataclasses.replace(config.polish, steps=polish_steps)
    return dataclasses.replace(config, train=train, sampler=sampler, polish=polish)


def _toy_data(name: str, n: int, seed: int) -> Any:
    import torch

    return make_toy_dataset(name).sample(n, generator=torch.Generator().manual_seed(seed))


def cmd_toy_train(args: argparse.Namespace) -> int:
    from ebm.checkpoint import save_model
    from ebm.toy import polish_checkpoint, train_energy

    recipe = _toy_recipe(args)
    dataset = make_toy_dataset(args.dataset)
    x_train = _toy_data(args.dataset, args.n_train, recipe.train.seed)
    checkpoint = _resume_checkpoint(args, recipe) if args.resume else None
    energy, result = train_energy(x_train, recipe, bounds=dataset.bounds, checkpoint_path=checkpoint)
    save_model(
        args.out,
        energy,
        kind="mlp_energy",
        config=recipe.model,
        metadata={"dataset": args.dataset, "steps": result.steps, "n_train": args.n_train},
    )
    if checkpoint is not None:  # finished: the next --resume starts afresh, not at step N
        checkpoint.unlink(missing_ok=True)
        polish_checkpoint(checkpoint).unlink(missing_ok=True)
    polished = (
        f", polished for {result.polish.steps} in {result.polish.seconds:.1f} s" if result.polish else ""
    )
    print(
        f"trained {args.dataset} for {result.steps} steps in {result.seconds:.1f} s "
        f"({result.recoveries} rollbacks){polished}; model written to {args.out}"
    )
    return 0


def _resume_checkpoint(args: argparse.Namespace, recipe: Any) -> Path:
    """``--resume``'s checkpoint beside OUT, named by everything that decides the run.

    Another dataset, number of points, seed or recipe written to the same OUT gets another file, so it
    never resumes this run's state (it used to, and could train zero steps and label the weights wrong).
    """
    from ebm.checkpoint import run_fingerprint
    from ebm.config import to_dict

    run = {"recipe": to_dict(recipe), "dataset": args.dataset, "n_train": args.n_train}
    return args.out.with_name(f"{args.out.stem}-{run_fingerprint(run)}.ckpt")


def _load_on_device(args: argparse.Namespace, recipe: Any) -> Any:
    from ebm.checkpoint import load_model
    from ebm.trainer import resolve_device

    return load_model(args.model, map_location=resolve_device(recipe.train.device))


def cmd_toy_evaluate(args: argparse.Namespace) -> int:
    from ebm.toy import evaluate_energy

    recipe = _toy_recipe(args)
    dataset = make_toy_dataset(args.dataset)
    energy = _load_on_device(args, recipe)
    x_train = _toy_data(args.dataset, args.n_train, recipe.train.seed)
    x_test = _toy_data(args.dataset, args.n_test, recipe.train.seed + 10_000)
    report, _ = evaluate_energy(energy, dataset, recipe, x_train=x_train, x_test=x_test, seed=args.seed or 0)
    values = dataclasses.asdict(report)
    for key, value in values.items():
        print(f"{key:>16}: {value:.5g}")
    if args.json is not None:
        from ebm.checkpoint import write_json  # atomic: a failed write keeps the previous file whole

        write_json(args.json, values)
    return 0


def cmd_toy_render(args: argparse.Namespace) -> int:
    import torch

    from ebm.plots import plot_energy_and_density, save_figure
    from ebm.toy import sample_energy

    recipe = _toy_recipe(args)
    dataset = make_toy_dataset(args.dataset)
    energy = _load_on_device(args, recipe)
    # the training points, as evaluate draws them: the mode jumps' proposal and the scatter (thinned there)
    data = _toy_data(args.dataset, args.n_train, recipe.train.seed)
    device = next(energy.parameters()).device
    samples = sample_energy(
        energy,
        recipe,
        dataset.bounds,
        x_train=data,
        generator=torch.Generator(device).manual_seed(args.seed or 0),
    )
    figure = plot_energy_and_density(
        energy, dataset.bounds, data=data, samples=samples[:2000], title=args.dataset
    )
    print(f"heatmap written to {save_figure(figure, args.out)}")
    return 0


def cmd_toy_classify(args: argparse.Namespace) -> int:
    import torch

    from ebm.classify2d import Classifier2DConfig, accuracy, make_labelled_2d, train_classifier
    from ebm.plots import plot_decision_energy, save_figure

    config = Classifier2DConfig()
    if args.steps is not None:
        config = dataclasses.replace(config, steps=args.steps)
    generator = torch.Generator().manual_seed(config.seed)
    x_train, y_train = make_labelled_2d(args.dataset, args.n_train, generator=generator)
    x_test, y_test = make_labelled_2d(args.dataset, args.n_test, generator=generator)
    energy = train_classifier(x_train, y_train, config)
    print(
        f"{args.dataset}: train accuracy {accuracy(energy, x_train, y_train):.4f}, "
        f"test accuracy {accuracy(energy, x_test, y_test):.4f}"
    )
    if args.out is not None:
        figure = plot_decision_energy(energy.joint, (-4.0, 4.0), x=x_test, y=y_test)
        print(f"decision-energy heatmap written to {save_figure(figure, args.out)}")
    return 0


def cmd_pipeline(args: argparse.Namespace) -> int:
    from flows.pipeline import main as pipeline_main

    pipeline_main([*(["--stages", *args.stages] if args.stages else [])])
    return 0


def _anomaly_features(args: argparse.Namespace, columns: Sequence[str]) -> tuple[list[str], list[str]]:
    """Feature columns for ``ebm anomaly``: ``--features`` (with ``--categorical``), else the
    synthetic-transactions features when the file has them, else every column but label and ``--ignore``."""
    from ebm.anomaly.transactions import CATEGORICAL_FEATURES, NUMERIC_FEATURES

    categorical = list(args.categorical or [])
    if args.features:
        return list(args.features), categorical
    known = [*NUMERIC_FEATURES, *CATEGORICAL_FEATURES]
    if all(c in columns for c in known):
        return known, categorical or list(CATEGORICAL_FEATURES)
    skip = {args.label, *(args.ignore or [])}
    return [c for c in columns if c not in skip], categorical


def _read_anomaly_table(args: argparse.Namespace) -> Any:
    from ebm.anomaly.validation import TableSchema, ValidationError, read_header, read_table

    features, categorical = _anomaly_features(args, read_header(args.data))
    schema = TableSchema(
        numeric=tuple(c for c in features if c not in categorical),
        categorical=tuple(categorical),
        label=args.label,
        label_required=args.label is not None,
    )
    try:
        return read_table(args.data, schema), features
    except ValidationError as err:
        if err.column in schema.numeric and "non-numeric" in str(err) and args.categorical is None:
            raise ValidationError(
                f"{err}; if {err.column!r} is a category, name it with --categorical", column=err.column
            ) from err
        raise


def cmd_anomaly_generate(args: argparse.Namespace) -> int:
    from ebm.anomaly.transactions import TransactionsConfig, generate_transactions, split_by_time, write_table

    config = TransactionsConfig(n_customers=args.customers, days=args.days, seed=args.seed)
    table = generate_transactions(config)
    written = [write_table(table, args.out)]
    if args.split:
        train, test = split_by_time(table)
        written += [
            write_table(train, args.out.with_name(f"{args.out.stem}-train{args.out.suffix}")),
            write_table(test, args.out.with_name(f"{args.out.stem}-test{args.out.suffix}")),
        ]
    print(
        f"{len(table):,} transactions, {int(table.is_fraud.sum()):,} fraudulent "
        f"({table.is_fraud.mean():.2%}); written to {', '.join(map(str, written))}"
    )
    return 0


def cmd_anomaly_fit(args: argparse.Namespace) -> int:
    from ebm.anomaly.detector import EnergyAnomalyDetector

    table, features = _read_anomaly_table(args)
    detector = EnergyAnomalyDetector(contamination=args.contamination, seed=args.seed)
    config = detector.config
    train = dataclasses.replace(
        config.train, progress=args.progress, steps=config.train.steps if args.steps is None else args.steps
    )
    members = config.n_members if args.members is None else args.members
    detector = EnergyAnomalyDetector(dataclasses.replace(config, train=train, n_members=members))
    detector.fit(table[features])
    detector.save(args.out, metadata={"source": str(args.data), "rows": len(table)})
    print(
        f"fitted on {len(table):,} rows × {len(features)} columns; threshold {detector.threshold_:.4g} "
        f"flags {detector.labels_.mean():.2%} of them; detector written to {args.out}"
    )
    return 0


def cmd_anomaly_evaluate(args: argparse.Namespace) -> int:
    from ebm.anomaly.detector import EnergyAnomalyDetector
    from ebm.anomaly.metrics import detection_metrics

    detector = EnergyAnomalyDetector.load(args.model)
    args.features = detector.feature_names_in_
    args.categorical = list(detector.schema.categorical) if detector.schema is not None else []
    table, features = _read_anomaly_table(args)
    report = detection_metrics(table[args.label].to_numpy(), detector.decision_function(table[features]))
    for key, value in report.as_dict().items():
        print(f"{key:>20}: {value:.4f}")
    if args.json is not None:
        from ebm.checkpoint import write_json

        write_json(args.json, report.as_dict())
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from ebm.anomaly.detector import EnergyAnomalyDetector
    from ebm.anomaly.scoring import score_file

    detector = EnergyAnomalyDetector.load(args.model)
    summary = score_file(
        detector,
        args.input,
        args.output,
        chunk_rows=args.chunk_rows,
        top_k=args.top_k,
        reasons=args.reasons,
        progress=not args.no_progress,
    )
    print(
        f"scored {summary.rows:,} rows in {summary.seconds:.2f} s ({summary.rows_per_second:,.0f} rows/s); "
        f"{summary.flagged:,} flagged; written to {summary.output}"
    )
    if args.histogram is not None:
        import pandas as pd

        from ebm.anomaly.explain import plot_score_histogram
        from ebm.anomaly.validation import file_format

        # the same rule score_file wrote by: .parquet or .pq, in any case, is Parquet
        scored = (
            pd.read_parquet(args.output)
            if file_format(args.output) == "parquet"
            else pd.read_csv(args.output)
        )
        path = plot_score_histogram(
            scored["anomaly_score"].to_numpy(),
            scored["is_anomaly"].to_numpy(),
            detector.threshold_,
            args.histogram,
        )
        print(f"energy histogram written to {path}")
    return 0


def cmd_rbm_loglik(args: argparse.Namespace) -> int:
    import torch

    from ebm.boltzmann.ais import RBMAISConfig, ais_log_partition, mean_log_likelihood
    from ebm.boltzmann.rbm import MAX_ENUMERATED_UNITS, BernoulliRBM, exact_log_partition
    from ebm.boltzmann.training import BinarizeConfig, binarize
    from ebm.checkpoint import load_checkpoint, model_from_payload
    from ebm.data.images import load_image_split

    payload = load_checkpoint(args.model)  # one read: the weights and the metadata recorded beside them
    rbm = model_from_payload(payload, args.model)
    if not isinstance(rbm, BernoulliRBM):
        raise ValueError(f"{args.model} holds a {type(rbm).__name__}, not an RBM")
    recorded = payload.get("metadata", {})
    config = BinarizeConfig(**recorded.get("binarize", {}))  # as the train_rbm stage binarised
    for field, value in (
        ("method", args.binarize),
        ("threshold", args.threshold),
        ("seed", args.binarize_seed),
    ):
        if value is not None:
            config = dataclasses.replace(config, **{field: value})
    data = args.data or Path("data/images") / recorded.get("dataset", "fashion_mnist")
    train = binarize(load_image_split(data, "train").images, config)
    test = binarize(load_image_split(data, "test").images, config, offset=2)[: args.max_test]
    ais_config = RBMAISConfig(n_chains=args.chains, n_temperatures=args.temperatures)
    ais = ais_log_partition(rbm, train, ais_config, generator=torch.Generator().manual_seed(args.seed))
    likelihood = mean_log_likelihood(rbm, test, ais.log_partition, ais.standard_error)
    print(
        f"log Z (AIS, {args.chains} chains × {args.temperatures} temperatures) = {ais.log_partition:.3f} "
        f"± {ais.standard_error:.3f} (ESS {ais.effective_sample_size:.1f})"
    )
    if min(rbm.n_hidden, rbm.n_visible) <= MAX_ENUMERATED_UNITS:
        print(f"log Z (exact, by enumeration) = {exact_log_partition(rbm):.3f}")
    print(
        f"test log-likelihood = {likelihood.mean:.2f} ± {likelihood.standard_error:.2f} nats per image "
        f"({likelihood.n_images} images)"
    )
    return 0


def _add_rbm_commands(commands: Any) -> None:
    rbm = commands.add_parser("rbm", help="restricted Boltzmann machines: log-likelihood by AIS")
    rbm_commands = rbm.add_subparsers(dest="rbm_command", required=True)
    loglik = rbm_commands.add_parser(
        "loglik", help="AIS estimate of log Z (exact too when enumerable) and the test log-likelihood"
    )
    loglik.add_argument("--model", type=Path, required=True, help="RBM file written by the train_rbm stage")
    loglik.add_argument(
        "--data",
        type=Path,
        default=None,
        help="prepared image splits (default: data/images/<the dataset the model file records>)",
    )
    loglik.add_argument(
        "--binarize",
        choices=["stochastic", "threshold"],
        default=None,
        help="how grey images become binary (default: as the model file records, else stochastic)",
    )
    loglik.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="the cut for --binarize threshold (default: as the model file records, else 0.5)",
    )
    loglik.add_argument(
        "--binarize-seed",
        type=int,
        default=None,
        help="seed of the stochastic draw (default: as the model file records, else 0)",
    )
    loglik.add_argument(
        "--chains", type=whole_number(2), default=100, help="AIS runs, ≥ 2 (default %(default)s)"
    )
    loglik.add_argument(
        "--temperatures",
        type=whole_number(3),
        default=14500,
        help="AIS distributions, the two ends included, ≥ 3 (default %(default)s)",
    )
    loglik.add_argument(
        "--max-test",
        type=_positive_int,
        default=None,
        help="score at most this many test images, ≥ 1 (default: all of them)",
    )
    loglik.add_argument("--seed", type=int, default=0, help="seed of the AIS chains (default %(default)s)")
    loglik.set_defaults(handler=cmd_rbm_loglik)


def _add_anomaly_commands(commands: Any) -> None:
    anomaly = commands.add_parser("anomaly", help="transaction anomaly detector: generate, fit, evaluate")
    anomaly_commands = anomaly.add_subparsers(dest="anomaly_command", required=True)

    generate = anomaly_commands.add_parser("generate", help="synthetic card transactions with labelled fraud")
    generate.add_argument(
        "--out",
        type=_output_file,
        default=Path("data/anomaly/transactions.parquet"),
        help="CSV or Parquet file to write (default %(default)s)",
    )
    generate.add_argument("--customers", type=int, default=3000, help="cards (default %(default)s)")
    generate.add_argument("--days", type=int, default=30, help="days of purchases (default %(default)s)")
    generate.add_argument("--seed", type=int, default=0, help="seed (default %(default)s)")
    generate.add_argument(
        "--split", action="store_true", help="also write OUT-train and OUT-test, split by time"
    )
    generate.set_defaults(handler=cmd_anomaly_generate)

    def table_options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--data", type=Path, required=True, help="CSV or Parquet table")
        parser.add_argument(
            "--features",
            nargs="+",
            default=None,
            help="feature columns (default: the transaction features if present, else all "
            "columns but --label and --ignore)",
        )
        parser.add_argument(
            "--categorical",
            nargs="+",
            default=None,
            help="which feature columns are categories (default: the transaction features' own, else none)",
        )
        parser.add_argument(
            "--ignore",
            nargs="+",
            default=None,
            help="columns that are not features, such as ids (default: none)",
        )

    fit = anomaly_commands.add_parser("fit", help="fit an EnergyAnomalyDetector on unlabelled rows")
    table_options(fit)
    fit.add_argument(
        "--label",
        default=None,
        help="a label column to leave out of the features, never used (default: none)",
    )
    fit.add_argument(
        "--out",
        type=_output_file,
        default=Path("models/anomaly/detector.pt"),
        help="detector file to write (default %(default)s)",
    )
    fit.add_argument(
        "--contamination",
        type=float,
        default=0.01,
        help="expected share of anomalies; sets the threshold (default %(default)s)",
    )
    fit.add_argument("--seed", type=int, default=0, help="seed (default %(default)s)")
    fit.add_argument("--progress", action="store_true", help="show training progress bars")
    fit.add_argument(
        "--members", type=int, default=None, help="residual energies to train (default: the detector's, 3)"
    )
    fit.add_argument("--steps", type=int, default=None, help="training steps per member (default: 200)")
    fit.set_defaults(handler=cmd_anomaly_fit)

    evaluate = anomaly_commands.add_parser("evaluate", help="AUROC, AUPRC, recall at 1%% FPR, precision@k")
    evaluate.add_argument("--model", type=Path, required=True, help="detector file from `ebm anomaly fit`")
    evaluate.add_argument("--data", type=Path, required=True, help="labelled CSV or Parquet table")
    evaluate.add_argument("--label", required=True, help="the 0/1 anomaly label column")
    evaluate.add_argument(
        "--json",
        type=_output_file,
        default=None,
        help="also write the figures to this JSON file (default: none)",
    )
    evaluate.set_defaults(handler=cmd_anomaly_evaluate, categorical=None, ignore=None)

    score = commands.add_parser("score", help="score a CSV/Parquet file with a detector (streamed, atomic)")
    score.add_argument("--model", type=Path, required=True, help="detector file from `ebm anomaly fit`")
    score.add_argument("--input", type=Path, required=True, help="CSV or Parquet file to score")
    score.add_argument(
        "--output", type=_output_file, required=True, help="CSV or Parquet file to write (atomically)"
    )
    score.add_argument(
        "--chunk-rows", type=_positive_int, default=262_144, help="rows per chunk (default %(default)s)"
    )
    score.add_argument(
        "--top-k", type=_non_negative_int, default=3, help="reasons per row; 0 for none (default %(default)s)"
    )
    score.add_argument(
        "--reasons",
        choices=["flagged", "all", "none"],
        default="flagged",
        help="rows that get reasons (default %(default)s: the flagged ones)",
    )
    score.add_argument("--no-progress", action="store_true", help="no progress bar")
    score.add_argument(
        "--histogram",
        type=_output_file,
        default=None,
        help="also write the energy histogram, PNG (default: none)",
    )
    score.set_defaults(handler=cmd_score)


def _add_recipe_options(parser: argparse.ArgumentParser, *, training: bool = False) -> None:
    parser.add_argument(
        "--params",
        type=Path,
        default=None,
        help="read the recipe from the `toy` section of this params file "
        "(default: the built-in 2D recipe, the same as params.yaml ships)",
    )
    if training:
        parser.add_argument(
            "--steps", type=_positive_int, default=None, help="training steps (default: the recipe's, 8000)"
        )
        parser.add_argument(
            "--polish-steps",
            type=whole_number(0),
            default=None,
            help="steps of exact-likelihood fine-tuning after PCD, log Z over a jittered grid; 0: off "
            "(default: the recipe's, 400)",
        )
    parser.add_argument(
        "--sampler",
        choices=["langevin", "mala"],
        default=None,
        help="negative sampler (default: the recipe's, mala); langevin runs without the recipe's "
        "mode jumps, which are Metropolis moves",
    )
    parser.add_argument(
        "--step-size", type=float, default=None, help="sampler step size η (default: the recipe's, 0.05)"
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="seed of data, initialisation and chains (default 0)"
    )
    parser.add_argument(
        "--device",
        default=None,
        help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, … (default: the recipe's, auto)",
    )
    parser.add_argument(
        "--n-train",
        type=whole_number(5),
        default=20_000,
        help="training points drawn, ≥ 5 (the KDE baseline's 5-fold bandwidth search; default %(default)s)",
    )


def build_parser() -> argparse.ArgumentParser:
    from ebm.classify2d import Classifier2DConfig  # its defaults are quoted in the help

    parser = argparse.ArgumentParser(
        prog="ebm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)

    toy = commands.add_parser("toy", help="2D density models: train, evaluate, render, classify")
    toy_commands = toy.add_subparsers(dest="toy_command", required=True)
    dataset_help = "2D dataset: " + ", ".join(TOY_DATASETS) + " (default %(default)s)"

    train = toy_commands.add_parser(
        "train",
        help="train an energy on a 2D dataset by PCD with MALA negatives, then polish it by exact likelihood",
    )
    train.add_argument("--dataset", choices=list(TOY_DATASETS), default="8gaussians", help=dataset_help)
    train.add_argument(
        "--out",
        type=_output_file,
        default=Path("models/toy-model.pt"),
        help="model file to write (default %(default)s)",
    )
    train.add_argument(
        "--resume",
        action="store_true",
        help="checkpoint beside OUT as training goes (OUT-<hash of the run>.ckpt) and resume from it if "
        "the same run left one; deleted once the model is written",
    )
    _add_recipe_options(train, training=True)
    train.set_defaults(handler=cmd_toy_train)

    evaluate = toy_commands.add_parser(
        "evaluate", help="exact-grid NLL, entropy-floor gap, MMD and the KDE baseline"
    )
    evaluate.add_argument("--dataset", choices=list(TOY_DATASETS), default="8gaussians", help=dataset_help)
    evaluate.add_argument("--model", type=Path, required=True, help="model file written by `ebm toy train`")
    evaluate.add_argument(
        "--n-test", type=whole_number(2), default=20_000, help="fresh test points, ≥ 2 (default %(default)s)"
    )
    evaluate.add_argument(
        "--json",
        type=_output_file,
        default=None,
        help="also write the figures to this JSON file (default: none)",
    )
    _add_recipe_options(evaluate)
    evaluate.set_defaults(handler=cmd_toy_evaluate)

    render = toy_commands.add_parser("render", help="energy and density heatmaps with data and samples (PNG)")
    render.add_argument("--dataset", choices=list(TOY_DATASETS), default="8gaussians", help=dataset_help)
    render.add_argument("--model", type=Path, required=True, help="model file written by `ebm toy train`")
    render.add_argument(
        "--out", type=_output_file, default=Path("heatmap.png"), help="PNG to write (default %(default)s)"
    )
    _add_recipe_options(render)
    render.set_defaults(handler=cmd_toy_render)

    classify = toy_commands.add_parser("classify", help="binary classification with an energy E(x, y)")
    classify.add_argument(
        "--dataset", default="moons", help="labelled 2D dataset: moons, blobs or xor (default %(default)s)"
    )
    classify.add_argument(
        "--steps",
        type=_positive_int,
        default=None,
        help=f"training steps (default: the recipe's, {Classifier2DConfig.steps})",
    )
    classify.add_argument(
        "--n-train", type=_positive_int, default=2000, help="training points (default %(default)s)"
    )
    classify.add_argument(
        "--n-test", type=_positive_int, default=2000, help="test points (default %(default)s)"
    )
    classify.add_argument(
        "--out",
        type=_output_file,
        default=None,
        help="write the decision-energy heatmap here, PNG (default: none)",
    )
    classify.set_defaults(handler=cmd_toy_classify)

    pipeline = commands.add_parser("pipeline", help="run the DVC pipeline stage by stage through Prefect")
    pipeline.add_argument(
        "--stages",
        nargs="*",
        default=None,
        help="run these stages and every stage upstream of them (default: all)",
    )
    pipeline.set_defaults(handler=cmd_pipeline)

    _add_anomaly_commands(commands)
    _add_rbm_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except (ValueError, OSError, RuntimeError) as err:  # OSError: a file that cannot be read or written
        print(f"ebm: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
