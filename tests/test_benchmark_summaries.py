"""The benchmarks' verdicts and summary figures, on hand-made rows: what they print and record is what
the bars say (a flipped sign, a mean for a median or a dropped figure would otherwise pass unseen)."""

from __future__ import annotations

import pytest
from test_benchmark_flags import load


def test_toy_density_counts_the_bar_and_takes_the_median_training_time() -> None:
    toy = load("toy_density")
    rows = [
        {"gap": 0.010, "pcd_gap": 0.012, "nll": 2.0, "kde_nll": 2.1, "train_seconds": 100.0},
        {"gap": 0.030, "pcd_gap": 0.025, "nll": 3.0, "kde_nll": 2.9, "train_seconds": 110.0},
        {"gap": toy.GAP_GOAL, "pcd_gap": 0.021, "nll": 1.0, "kde_nll": 1.5, "train_seconds": 400.0},
    ]
    assert toy.summarise(rows) == {
        "within_goal": 2,  # the goal itself counts as within
        "pcd_within_goal": 1,  # counted on PCD's own gaps, not the polished ones
        "beats_kde": 2,  # a lower NLL than the KDE's
        "gap_goal": toy.GAP_GOAL,
        "within_time_goal": 2,  # 400 s is past the 3 minutes
        "time_goal_seconds": 180.0,
        "median_train_seconds": 110.0,  # not the mean, 203.3
    }


def test_sampling_speedups_are_textbook_over_library_medians() -> None:
    sampling = load("sampling")
    rounds = [
        {"textbook_ms": 100.0, "library_ms": 50.0},
        {"textbook_ms": 100.0, "library_ms": 25.0},
        {"textbook_ms": 100.0, "library_ms": 10.0},
    ]
    assert sampling.median_ratio(rounds, "library_ms") == 4.0  # 2, 4, 10: the median, not the mean 5.33
    variant = {"ms_per_step": 20.0, "cpu_ms_per_step": 30.0, "gflops": 5.0}
    throughput = [
        {
            "model": "cnn28",
            "batch": 128,
            "gflop_per_step": 0.1,
            "textbook_gflop_per_step": 0.3,
            "variants": {
                "textbook": {"ms_per_step": 100.0, "cpu_ms_per_step": 120.0, "gflops": 1.0},
                "fast": variant,
                "slow": {**variant, "ms_per_step": 50.0, "cpu_ms_per_step": 60.0},
            },
        }
    ]
    verdict = sampling.bar_verdict(throughput, peak=50.0, peak_cpu=25.0)
    assert (verdict["variant"], verdict["speedup"], verdict["cpu_speedup"]) == ("fast", 5.0, 4.0)
    assert verdict["peak_fraction"] == pytest.approx(0.1)
    assert verdict["speedup_met"] is (5.0 >= sampling.BAR_SPEEDUP)
    assert verdict["peak_met"] is (0.1 >= sampling.BAR_PEAK_FRACTION)


@pytest.mark.parametrize(
    ("ebm", "expected"),
    [
        ({"auroc": 0.95, "auprc": 0.80}, {"auroc": True, "auprc": True}),
        ({"auroc": 0.95, "auprc": 0.60}, {"auroc": True, "auprc": False}),  # best AUPRC is ECOD's, not IF's
        ({"auroc": 0.85, "auprc": 0.80}, {"auroc": False, "auprc": True}),
    ],
)
def test_the_anomaly_bars_compare_with_the_best_baseline_figure_by_figure(
    ebm: dict[str, float], expected: dict[str, bool]
) -> None:
    anomaly = load("anomaly")
    results = {"ebm": ebm, "iforest": {"auroc": 0.90, "auprc": 0.50}, "ecod": {"auroc": 0.80, "auprc": 0.70}}
    results = {name: results.get(name, {"auroc": 0.0, "auprc": 0.0}) for name in ("ebm", *anomaly.BASELINES)}
    best = anomaly.best_of_baselines(results)
    assert best == {"auroc": 0.90, "auprc": 0.70}
    assert anomaly.bars_against(ebm, best) == {f"ebm_{m}_ge_best_baseline": v for m, v in expected.items()}
    training = load("training")
    assert training.meets_bar(ebm["auroc"], ebm["auprc"], best) is all(expected.values())
