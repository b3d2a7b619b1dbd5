"""The anomaly detector against the standard detectors, side by side, defaults only, in one run::

    python benchmarks/anomaly.py --json reports/bench/anomaly.json            # every part, every bar
    python benchmarks/anomaly.py --json q.json --only synthetic public        # detection quality only
    python benchmarks/anomaly.py --json t.json --only throughput              # rows/s, model and CSV
    python benchmarks/anomaly.py --json s.json --only serving --clients 32 --requests 1000

Parts (``--only`` picks some; the default runs them all, so one run checks every bar):

- ``synthetic``: the synthetic card transactions (``TransactionsConfig()``, 3,000 cards, 30 days), the
  detector fitted on the earlier 60 % without labels and scored on the later 40 %. Bar: the EBM's AUROC
  and AUPRC ≥ the best baseline's.
- ``public``: the ADBench-style sets of :mod:`ebm.anomaly.public` (scikit-learn's bundled data, one
  class downsampled into anomalies), ``--seeds`` seeds each. Bar: the EBM's mean AUROC above
  IsolationForest's on the same splits.
- ``typed``: ADBench's four synthetic anomaly types (local, global, dependency, clustered) on real
  normal rows; informative, no bar.
- ``creditcard``: the public credit-card fraud file, if ``--creditcard`` (default
  ``data/creditcard.csv``) exists; stratified 60/40 split.
- ``throughput``: rows/s of the model alone (preprocessed float32 rows, ``torch.inference_mode``) and of
  ``ebm score`` end to end from CSV to CSV with reasons. Bars: ≥ 1 M and ≥ 200 k rows/s.
- ``serving``: ``mlflow models serve`` on loopback, ``--clients`` concurrent clients × ``--requests``
  one-row JSON requests each: errors, and the p50 and p99 latency of the answered ones.

Metrics per method: AUROC, AUPRC, recall at 1 % FPR, precision@k (k = number of anomalies). Baselines:
scikit-learn's IsolationForest, PyOD's ECOD and LOF, all with library defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ebm.anomaly.baselines import BASELINES, fit_score
from ebm.anomaly.detector import BATCH_ROWS, EnergyAnomalyDetector
from ebm.anomaly.metrics import detection_metrics
from ebm.anomaly.public import ANOMALY_TYPES, PUBLIC_SETS, TYPE_SOURCES, make_public_split, make_typed_split
from ebm.anomaly.transactions import (
    FEATURES,
    FRAUD_TYPES,
    LABEL,
    TransactionsConfig,
    generate_transactions,
    load_creditcard,
    split_by_time,
    write_table,
)
from ebm.checkpoint import write_report_json
from ebm.config import to_dict, whole_number

METHODS = ("ebm", *BASELINES)
PARTS = ("synthetic", "public", "typed", "creditcard", "throughput", "serving")


def best_of_baselines(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The best AUROC and the best AUPRC over the baselines (each from whichever baseline has it)."""
    return {m: max(results[b][m] for b in BASELINES) for m in ("auroc", "auprc")}


def bars_against(ebm: dict[str, Any], best: dict[str, float]) -> dict[str, bool]:
    """The issue's bar: the EBM's AUROC and AUPRC each at least the best baseline's."""
    return {f"ebm_{m}_ge_best_baseline": ebm[m] >= best[m] for m in ("auroc", "auprc")}


def compare(
    train: pd.DataFrame | np.ndarray, test: pd.DataFrame | np.ndarray, labels: np.ndarray, seed: int
) -> dict[str, dict[str, float]]:
    """Every method fitted on ``train`` (labels unseen) and measured on ``test``."""
    results: dict[str, dict[str, float]] = {}
    for method in METHODS:
        start = time.perf_counter()
        if method == "ebm":
            scores = EnergyAnomalyDetector(seed=seed).fit(train).decision_function(test)
        else:
            scores = fit_score(method, train, test, seed=seed)
        results[method] = {
            **detection_metrics(labels, scores).as_dict(),
            "seconds": time.perf_counter() - start,
        }
        if method == "ebm":
            results[method]["_scores"] = scores  # type: ignore[assignment]
    return results


def run_synthetic(args: argparse.Namespace) -> dict[str, Any]:
    table = generate_transactions(TransactionsConfig(seed=args.data_seed))
    train, test = split_by_time(table)
    labels = test[LABEL].to_numpy()
    results = compare(train[FEATURES], test[FEATURES], labels, seed=0)
    scores = results["ebm"].pop("_scores")  # type: ignore[arg-type]
    by_type = {}
    for kind in FRAUD_TYPES:
        rows = ((test.fraud_type == kind) | (test[LABEL] == 0)).to_numpy()
        by_type[kind] = detection_metrics(labels[rows], np.asarray(scores)[rows]).auroc
    best = best_of_baselines(results)
    bars = bars_against(results["ebm"], best)
    _print_table("synthetic transactions (test period)", {"transactions": results})
    print("EBM AUROC by fraud type: " + ", ".join(f"{k} {v:.3f}" for k, v in by_type.items()))
    return {
        "rows": {"train": len(train), "test": len(test), "test_fraud_share": float(labels.mean())},
        "methods": results,
        "ebm_auroc_by_fraud_type": by_type,
        "best_baseline": best,
        "bars": bars,
    }


def _many(
    names: Sequence[str], make: Callable[[str, int], Any], seeds: Sequence[int], title: str
) -> dict[str, Any]:
    per_set: dict[str, dict[str, dict[str, float]]] = {}
    for name in names:
        runs = []
        for seed in seeds:
            split = make(name, seed)
            result = compare(split.x_train, split.x_test, split.y_test, seed)
            result["ebm"].pop("_scores")
            runs.append(result)
        per_set[name] = {
            method: {key: float(np.mean([r[method][key] for r in runs])) for key in runs[0][method]}
            for method in METHODS
        }
        per_set[name]["ebm"]["auroc_std"] = float(np.std([r["ebm"]["auroc"] for r in runs]))
        print(f"  {name}: " + ", ".join(f"{m} {per_set[name][m]['auroc']:.3f}" for m in METHODS), flush=True)
    means = {
        method: {k: float(np.mean([per_set[n][method][k] for n in names])) for k in ("auroc", "auprc")}
        for method in METHODS
    }
    _print_table(title, per_set)
    print("mean AUROC: " + ", ".join(f"{m} {means[m]['auroc']:.4f}" for m in METHODS))
    return {"sets": per_set, "mean": means, "seeds": list(seeds)}


def run_public(args: argparse.Namespace) -> dict[str, Any]:
    report = _many(args.sets, make_public_split, range(args.seeds), "public sets (mean over seeds)")
    means = report["mean"]
    report["bars"] = {"ebm_mean_auroc_above_iforest": means["ebm"]["auroc"] > means["iforest"]["auroc"]}
    return report


def run_typed(args: argparse.Namespace) -> dict[str, Any]:
    names = [f"{source}:{kind}" for source in TYPE_SOURCES for kind in ANOMALY_TYPES]
    return _many(
        names,
        lambda name, seed: make_typed_split(*name.split(":"), seed),
        range(args.typed_seeds),
        "ADBench types",
    )


def run_creditcard(args: argparse.Namespace) -> dict[str, Any] | None:
    if not args.creditcard.is_file():
        print(f"credit-card file {args.creditcard} not present: skipped")
        return None
    from sklearn.model_selection import train_test_split

    features, labels = load_creditcard(args.creditcard)
    x_train, x_test, _, y_test = train_test_split(
        features, labels, test_size=0.4, stratify=labels, random_state=0
    )
    results = compare(x_train, x_test, y_test, seed=0)
    results["ebm"].pop("_scores")
    _print_table("credit-card fraud", {"creditcard": results})
    return {"methods": results}


def run_throughput(args: argparse.Namespace) -> dict[str, Any]:
    """Rows/s of the model alone and of CSV → CSV scoring with reasons, on a default detector."""
    from ebm.anomaly.scoring import score_file

    table = generate_transactions(TransactionsConfig(n_customers=1000, seed=args.data_seed))
    train, _ = split_by_time(table)
    detector = EnergyAnomalyDetector().fit(train[FEATURES])
    energy = detector.energy
    assert energy is not None
    rng = np.random.default_rng(0)
    big = table.iloc[rng.integers(0, len(table), size=args.rows)].reset_index(drop=True)
    x = detector.transform(big[FEATURES])
    load_before = list(os.getloadavg())  # timings on a shared machine: say how busy it was
    with torch.inference_mode():
        energy(x[:1000])
        start, cpu_start = time.perf_counter(), time.process_time()
        for begin in range(0, x.shape[0], BATCH_ROWS):
            energy(x[begin : begin + BATCH_ROWS])
        model_seconds = time.perf_counter() - start
        # CPU seconds of both threads: what the rate would be on two idle cores, whatever the load now
        model_cpu_seconds = time.process_time() - cpu_start
    with tempfile.TemporaryDirectory() as folder:
        source = write_table(big, Path(folder) / "input.csv")
        size = source.stat().st_size
        runs = {}
        for top_k in (3, 0):
            summary = score_file(detector, source, Path(folder) / "scored.csv", top_k=top_k, progress=False)
            runs[f"csv_to_csv_top{top_k}_rows_per_s"] = summary.rows_per_second
    report = {
        "load_average_before": load_before,
        "load_average_after": list(os.getloadavg()),
        "rows": args.rows,
        "csv_megabytes": size / 1e6,
        "threads": torch.get_num_threads(),
        "model_rows_per_s": args.rows / model_seconds,
        "model_rows_per_cpu_s": args.rows / model_cpu_seconds,
        "model_rows_per_s_on_2_idle_cores_estimate": 2 * args.rows / model_cpu_seconds,
        **runs,
    }
    report["bars"] = {
        "model_ge_1M_rows_per_s": report["model_rows_per_s"] >= 1e6,
        "end_to_end_ge_200k_rows_per_s": report["csv_to_csv_top3_rows_per_s"] >= 2e5,
    }
    print(json.dumps(report, indent=2))
    return report


def run_serving(args: argparse.Namespace) -> dict[str, Any]:
    """``mlflow models serve`` of a registered default detector, hammered by concurrent clients."""
    import signal
    import socket
    import subprocess
    import urllib.error
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    from ebm.anomaly.registry import register_detector
    from ebm.offline import apply_offline_env

    apply_offline_env()
    table = generate_transactions(TransactionsConfig(n_customers=500, seed=args.data_seed))
    with tempfile.TemporaryDirectory() as folder:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder}/mlflow.db"
        import mlflow

        mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
        detector = EnergyAnomalyDetector().fit(table[FEATURES])
        detector.save(Path(folder) / "detector.pt")
        register_detector(
            Path(folder) / "detector.pt", table[FEATURES].head(5), metric_name="auprc", metric_value=0
        )
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        command = [
            sys.executable,
            "-m",
            "mlflow",
            "models",
            "serve",
            "-m",
            "models:/ebm-anomaly-detector@champion",
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "--workers",
            str(args.workers),
        ]
        server = subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 180
            while True:
                try:
                    with urllib.request.urlopen(f"{url}/ping", timeout=2):
                        break
                except OSError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError("model server did not start") from None
                    time.sleep(0.25)
            bodies = [
                json.dumps(
                    {"dataframe_records": json.loads(table[FEATURES].iloc[[i]].to_json(orient="records"))}
                ).encode()
                for i in range(200)
            ]

            def client(index: int) -> tuple[list[float], int]:
                latencies, errors = [], 0
                for request_index in range(args.requests):
                    body = bodies[(index * 7 + request_index) % len(bodies)]
                    request = urllib.request.Request(
                        f"{url}/invocations", data=body, headers={"Content-Type": "application/json"}
                    )
                    start = time.perf_counter()
                    try:
                        with urllib.request.urlopen(request, timeout=60) as response:
                            ok = response.status == 200 and b"anomaly_score" in response.read()
                    except (urllib.error.URLError, OSError):
                        ok = False
                    if ok:  # a refused or timed-out request is an error, not a latency
                        latencies.append(time.perf_counter() - start)
                    errors += not ok
                return latencies, errors

            load_before = list(os.getloadavg())
            start = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                outcomes = list(pool.map(client, range(args.clients)))
            seconds = time.perf_counter() - start
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)
    latencies = np.concatenate([np.asarray(latency) for latency, _ in outcomes]) * 1000
    report = {
        "load_average_before": load_before,
        "load_average_after": list(os.getloadavg()),
        "clients": args.clients,
        "requests_per_client": args.requests,
        "server_workers": args.workers,
        "requests": int(latencies.size),  # answered with scores; p50, p99 and the rate count these only
        "errors": int(sum(errors for _, errors in outcomes)),
        "p50_ms": float(np.percentile(latencies, 50)) if latencies.size else float("nan"),
        "p99_ms": float(np.percentile(latencies, 99)) if latencies.size else float("nan"),
        "requests_per_s": latencies.size / seconds,
    }
    print(json.dumps(report, indent=2))
    return report


def _print_table(title: str, results: dict[str, dict[str, dict[str, float]]]) -> None:
    print(f"\n{title}")
    keys = ("auroc", "auprc", "recall_at_1pct_fpr", "precision_at_k")
    print(f"{'set':<28}{'method':<9}" + "".join(f"{k[:12]:>14}" for k in keys))
    for name, methods in results.items():
        for method, values in methods.items():
            print(f"{name:<28}{method:<9}" + "".join(f"{values[k]:>14.4f}" for k in keys))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", type=Path, required=True, help="write every figure here")
    parser.add_argument(
        "--only", nargs="+", choices=PARTS, default=list(PARTS), help="parts to run (default: all)"
    )
    parser.add_argument(
        "--seeds", type=whole_number(1), default=5, help="seeds per public set (default %(default)s)"
    )
    parser.add_argument(
        "--typed-seeds", type=whole_number(1), default=2, help="seeds per typed set (default %(default)s)"
    )
    parser.add_argument("--sets", nargs="+", default=list(PUBLIC_SETS), choices=list(PUBLIC_SETS))
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic world")
    parser.add_argument("--creditcard", type=Path, default=Path("data/creditcard.csv"))
    parser.add_argument(
        "--rows", type=whole_number(1), default=1_000_000, help="rows for the throughput part"
    )
    parser.add_argument(
        "--clients", type=whole_number(1), default=32, help="concurrent clients for the serving part"
    )
    parser.add_argument("--requests", type=whole_number(1), default=1000, help="requests per client")
    parser.add_argument("--workers", type=whole_number(1), default=2, help="server worker processes")
    args = parser.parse_args(argv)

    from ebm.anomaly.detector import DetectorConfig

    report: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_average": list(os.getloadavg()),
        "detector_defaults": to_dict(DetectorConfig()),
    }
    start = time.perf_counter()
    runners = {
        "synthetic": run_synthetic,
        "public": run_public,
        "typed": run_typed,
        "creditcard": run_creditcard,
        "throughput": run_throughput,
        "serving": run_serving,
    }
    for part in PARTS:
        if part in args.only:
            print(f"\n=== {part} ===", flush=True)
            report[part] = runners[part](args)
    report["seconds"] = time.perf_counter() - start
    write_report_json(args.json, report, default=float)
    bars = {
        f"{part}.{k}": v
        for part in PARTS
        if isinstance(report.get(part), dict)
        for k, v in report[part].get("bars", {}).items()
    }
    print("\nbars: " + ", ".join(f"{k} {'PASS' if v else 'FAIL'}" for k, v in bars.items()))
    print(f"written to {args.json} in {report['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
