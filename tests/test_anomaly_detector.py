"""EnergyAnomalyDetector: PyOD/scikit-learn conventions, thresholds, saving, validation, behaviour."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import Tensor

from ebm.anomaly.detector import DetectorConfig, EnergyAnomalyDetector, make_detector
from ebm.anomaly.explain import attribute, reference_row, score_and_attribute, to_raw_columns
from ebm.anomaly.metrics import detection_metrics
from ebm.anomaly.preprocessing import PreprocessConfig
from ebm.anomaly.validation import ValidationError
from ebm.checkpoint import CheckpointError, load_checkpoint


def quick_config(steps: int = 20, members: int = 1, **overrides: object) -> DetectorConfig:
    config = DetectorConfig(n_members=members, widths=(16, 16), grid_size=256, **overrides)  # type: ignore[arg-type]
    return dataclasses.replace(config, train=dataclasses.replace(config.train, steps=steps, batch_size=128))


def make_rows(n: int, seed: int, kind: str = "normal") -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x1 = rng.normal(size=n)
    x2 = x1 + 0.2 * rng.normal(size=n)
    amount = np.exp(rng.normal(3, 0.5, size=n))
    category = rng.choice(["grocery", "fuel", "travel"], p=[0.6, 0.3, 0.1], size=n)
    if kind == "global":
        amount = amount * 60
    elif kind == "dependency":
        x2 = -x1 + 0.2 * rng.normal(size=n)
    elif kind == "category":
        category = np.full(n, "casino")
    return pd.DataFrame({"x1": x1, "x2": x2, "amount": amount, "category": category})


@pytest.fixture(scope="module")
def train_rows() -> pd.DataFrame:
    return pd.concat([make_rows(1500, 0), make_rows(15, 1, "global")], ignore_index=True)


@pytest.fixture(scope="module")
def detector(train_rows: pd.DataFrame) -> EnergyAnomalyDetector:
    return EnergyAnomalyDetector(quick_config()).fit(train_rows)


def test_fit_learns_columns_log_amounts_and_categories(detector: EnergyAnomalyDetector) -> None:
    assert detector.feature_names_in_ == ["x1", "x2", "amount", "category"]
    assert detector.preprocessor.log_columns == [] or "amount" in detector.preprocessor.log_columns
    assert detector.schema is not None and detector.schema.categorical == ("category",)
    assert "category=__other__" in detector.preprocessor.encoded_names


def test_decision_function_is_higher_for_anomalies(detector: EnergyAnomalyDetector) -> None:
    normal = make_rows(400, 10)
    # 1 % of the training rows are amounts 60× the usual, so those form a cluster the energy has seen:
    # the hard, clustered case (the marginals alone reach 0.90 here, IsolationForest-style isolation more).
    for kind, bar in (("global", 0.9), ("category", 0.99)):
        anomalies = make_rows(20, 11, kind)
        scores = detector.decision_function(pd.concat([normal, anomalies]))
        labels = np.r_[np.zeros(400), np.ones(20)]
        assert detection_metrics(labels, scores).auroc > bar, kind


def test_threshold_follows_contamination_and_predict_is_zero_one(detector: EnergyAnomalyDetector) -> None:
    assert detector.labels_.mean() == pytest.approx(detector.config.contamination, abs=0.005)
    flags = detector.predict(make_rows(200, 12))
    assert flags.dtype == np.int64 and set(np.unique(flags)) <= {0, 1}
    assert (detector.decision_scores_ > detector.threshold_).sum() == detector.labels_.sum()


def test_calibrate_sets_the_false_positive_rate_on_held_out_rows(train_rows: pd.DataFrame) -> None:
    detector = EnergyAnomalyDetector(quick_config(steps=5)).fit(train_rows)
    holdout = make_rows(2000, 13)
    threshold = detector.calibrate(holdout, fpr=0.05)
    assert threshold == detector.threshold_
    assert detector.predict(holdout).mean() == pytest.approx(0.05, abs=0.002)
    assert detector.predict(make_rows(2000, 14)).mean() == pytest.approx(0.05, abs=0.02)


def test_the_residual_offset_is_its_median_on_the_training_rows(
    detector: EnergyAnomalyDetector, train_rows: pd.DataFrame
) -> None:
    """f̄₀, from which the residual part counts, is the median residual: half the training rows get none."""
    with torch.inference_mode():
        residual = detector.energy.residual(detector.transform(train_rows))
    assert float(detector.energy.offset) == pytest.approx(float(residual.median()), abs=1e-6)
    assert float(residual.mean()) != pytest.approx(float(residual.median()), abs=1e-6)  # the two differ here


@pytest.fixture(scope="module")
def marginal_detector(train_rows: pd.DataFrame) -> EnergyAnomalyDetector:
    """No residual members: quick to fit, and ``calibrate`` may move its threshold freely."""
    return EnergyAnomalyDetector(quick_config(members=0)).fit(train_rows)


@pytest.mark.parametrize("n", [100, 1000])
def test_calibrate_flags_floor_fpr_n_held_out_rows_with_distinct_scores(
    marginal_detector: EnergyAnomalyDetector, n: int
) -> None:
    holdout = make_rows(n, 16)
    assert np.unique(marginal_detector.decision_function(holdout)).size == n  # no ties
    for fpr in (0.01, 0.05, 0.07, 0.29):
        marginal_detector.calibrate(holdout, fpr=fpr)
        assert marginal_detector.predict(holdout).sum() == round(fpr * n), fpr  # fpr · n is whole here
    marginal_detector.calibrate(holdout, fpr=0.5 / n)  # less than one row's worth: nothing may be flagged
    assert marginal_detector.predict(holdout).sum() == 0


def test_calibrate_never_flags_more_than_fpr_of_tied_rows(marginal_detector: EnergyAnomalyDetector) -> None:
    holdout = make_rows(10, 17).loc[np.repeat(np.arange(10), 10)]  # 100 rows, 10 tied at each score
    scores = marginal_detector.decision_function(holdout)
    for fpr in (0.01, 0.05, 0.1, 0.15, 0.25, 0.5):
        marginal_detector.calibrate(holdout, fpr=fpr)
        flagged = marginal_detector.predict(holdout).mean()
        best = max((scores > t).mean() for t in scores if (scores > t).mean() <= fpr)
        assert flagged <= fpr and flagged == best, fpr  # whole groups of 10: 0.1 for 0.15, 0.2 for 0.25


@pytest.mark.parametrize("fpr", [0.0, 1.0, float("nan")])
def test_calibrate_refuses_a_rate_outside_zero_one(
    marginal_detector: EnergyAnomalyDetector, fpr: float
) -> None:
    with pytest.raises(ValueError, match="fpr must lie in"):
        marginal_detector.calibrate(make_rows(50, 18), fpr=fpr)


def test_save_and_load_give_the_same_scores_from_a_weights_only_file(
    detector: EnergyAnomalyDetector, tmp_path: Path
) -> None:
    path = detector.save(tmp_path / "detector.pt", metadata={"note": "test"})
    payload = torch.load(path, weights_only=True)  # no pickled objects: plain data and tensors only
    assert payload["kind"] == "ebm-anomaly-detector"
    loaded = EnergyAnomalyDetector.load(path)
    rows = make_rows(100, 15)
    np.testing.assert_array_equal(loaded.decision_function(rows), detector.decision_function(rows))
    assert loaded.threshold_ == detector.threshold_ and loaded.config == detector.config
    np.testing.assert_allclose(loaded.score_quantiles_, detector.score_quantiles_)


@pytest.mark.parametrize(
    ("metadata", "where", "kind"),
    [
        ({"source": Path("data.csv")}, "metadata['source']", "pathlib."),
        ({"runs": [{"ok": 1}, {"scores": np.zeros(3)}]}, "metadata['runs'][1]['scores']", "numpy.ndarray"),
        ({"weights": torch.ones(2)}, "metadata['weights']", "torch.Tensor"),
        ({"when": np.datetime64("2024-01-01")}, "metadata['when']", "numpy.datetime64"),
        ({"by_seed": {0: 0.9}}, "metadata['by_seed'] has the key 0", "int"),
        ([("note", "x")], "metadata must be a dict", "list"),
    ],
)
def test_save_refuses_metadata_that_load_would_refuse_and_keeps_the_old_file(
    detector: EnergyAnomalyDetector, tmp_path: Path, metadata: object, where: str, kind: str
) -> None:
    path = detector.save(tmp_path / "detector.pt", metadata={"note": "the good one"})
    before = path.read_bytes()
    with pytest.raises(TypeError) as error:
        detector.save(path, metadata=metadata)  # type: ignore[arg-type]
    assert str(error.value).startswith(where) and kind in str(error.value)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["detector.pt"]
    EnergyAnomalyDetector.load(path)


def test_save_stores_numpy_scalars_in_metadata_as_python_values(
    detector: EnergyAnomalyDetector, tmp_path: Path
) -> None:
    metadata = {"auroc": np.float64(0.93), "rows": np.int64(7), "ok": np.bool_(True), "cols": ("a", "b")}
    path = detector.save(tmp_path / "detector.pt", metadata=metadata)
    EnergyAnomalyDetector.load(path)  # weights_only: a numpy scalar in the file would be refused here
    stored = load_checkpoint(path)["metadata"]
    assert stored == {"auroc": 0.93, "rows": 7, "ok": True, "cols": ["a", "b"]}
    assert [type(v) for v in stored.values()] == [float, int, bool, list]


def test_load_refuses_other_files(tmp_path: Path) -> None:
    torch.save({"format_version": 1, "kind": "mlp_energy"}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not an ebm-anomaly-detector"):
        EnergyAnomalyDetector.load(tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError):
        EnergyAnomalyDetector.load(tmp_path / "junk.pt")


def test_a_detector_saved_before_the_copula_is_refused_by_name(detector: EnergyAnomalyDetector) -> None:
    state = detector.state_dict()
    old = {**state, "energy": {k: v for k, v in state["energy"].items() if k != "marginal.normal_scores"}}
    old["config"] = {k: v for k, v in state["config"].items() if k != "copula_weight"}
    with pytest.raises(CheckpointError, match="saved before the detector gained its Gaussian copula"):
        EnergyAnomalyDetector.from_state_dict(old)


@pytest.mark.parametrize("weight", [-0.5, float("nan"), float("inf")])
def test_copula_weight_must_be_finite_and_not_negative(weight: float) -> None:
    with pytest.raises(ValueError, match="copula_weight must be a finite number ≥ 0"):
        DetectorConfig(copula_weight=weight)


def test_copula_weight_zero_leaves_the_copula_out(train_rows: pd.DataFrame) -> None:
    rows = make_rows(50, 17)
    without = EnergyAnomalyDetector(quick_config(members=0, copula_weight=0.0)).fit(train_rows)
    with_copula = EnergyAnomalyDetector(quick_config(members=0)).fit(train_rows)
    assert without.energy is not None and without.energy.copula is None
    assert with_copula.energy is not None and with_copula.energy.copula is not None
    x = with_copula.transform(rows)
    with torch.no_grad():
        copula = with_copula.energy.copula(with_copula.energy.marginal.normal_scores_of(x)).numpy()
    np.testing.assert_allclose(
        with_copula.decision_function(rows), without.decision_function(rows) + copula, rtol=1e-5, atol=1e-5
    )


def test_same_seed_same_detector(train_rows: pd.DataFrame) -> None:
    rows = make_rows(50, 16)
    first = EnergyAnomalyDetector(quick_config(steps=5)).fit(train_rows).decision_function(rows)
    second = EnergyAnomalyDetector(quick_config(steps=5)).fit(train_rows).decision_function(rows)
    np.testing.assert_array_equal(first, second)


def test_bad_inputs_are_refused_with_the_column_named(detector: EnergyAnomalyDetector) -> None:
    rows = make_rows(10, 17)
    rows.loc[3, "x2"] = np.nan
    with pytest.raises(ValidationError, match=r"'x2'.*row 4"):
        detector.decision_function(rows)
    with pytest.raises(ValidationError, match="missing column"):
        detector.decision_function(make_rows(10, 17).drop(columns="amount"))
    with pytest.raises(ValueError, match="columns"):
        detector.decision_function(np.zeros((3, 7)))
    with pytest.raises(RuntimeError, match="not fitted"):
        EnergyAnomalyDetector().decision_function(rows)


def test_arrays_work_as_in_scikit_learn() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 3))
    detector = EnergyAnomalyDetector(quick_config(steps=5)).fit(x)
    assert detector.feature_names_in_ == ["x0", "x1", "x2"]
    scores = detector.decision_function(np.r_[x[:50], [[8.0, 8.0, 8.0]]])
    assert scores.shape == (51,) and scores[-1] > scores[:-1].max()


def test_params_mapping_is_checked_key_by_key() -> None:
    assert make_detector({"n_members": 2, "train": {"steps": 7}}).config.train.steps == 7
    with pytest.raises(ValueError, match="n_memberz"):
        make_detector({"n_memberz": 2})


@pytest.mark.slow
def test_the_copula_and_the_residual_catch_broken_dependence_the_marginals_cannot_see(
    train_rows: pd.DataFrame,
) -> None:
    normal, broken = make_rows(400, 20), make_rows(40, 21, "dependency")
    rows, labels = pd.concat([normal, broken]), np.r_[np.zeros(400), np.ones(40)]
    marginal_only = EnergyAnomalyDetector(DetectorConfig(n_members=0, copula_weight=0.0)).fit(train_rows)
    copula_only = EnergyAnomalyDetector(DetectorConfig(n_members=0)).fit(train_rows)
    # The default residual MLPs (16-wide ones are too small to learn the dependence in 200 steps: ~0.73).
    with_residual = EnergyAnomalyDetector(DetectorConfig(n_members=2, copula_weight=0.0)).fit(train_rows)
    assert with_residual.energy is not None and copula_only.energy is not None
    assert with_residual.energy.copula is None and copula_only.energy.copula is not None
    with torch.no_grad():
        residual = with_residual.energy.residual(with_residual.transform(rows)).numpy()
    auroc_marginal = detection_metrics(labels, marginal_only.decision_function(rows)).auroc
    auroc_copula = detection_metrics(labels, copula_only.decision_function(rows)).auroc
    auroc_score = detection_metrics(labels, with_residual.decision_function(rows)).auroc
    assert auroc_marginal < 0.6  # the marginals of x1 and x2 are unchanged (measured 0.55)
    # x1 and x2 are correlated in the normal rows, independent in the broken ones (measured 0.86).
    assert auroc_copula > 0.8
    assert float(copula_only.energy.copula.shrinkage) < 1.0  # cross-validation kept the dependence
    # The learned energy sees the dependence (measured 0.78–0.92 for one member, by seed; untrained: 0.5).
    assert detection_metrics(labels, residual).auroc > 0.8
    assert auroc_score > auroc_marginal + 0.03  # at 0.3 of its weight it moves the score (measured +0.05)
    final = with_residual.history_[0][-1]
    assert final["energy_pos"] < final["energy_neg"]  # data sit lower than the model's own samples


# --- explanations of categories ------------------------------------------------------------------

LEVELS = ["grocery", "fuel", "travel"]


def uniform_category_rows(n: int, seed: int) -> pd.DataFrame:
    """Numeric columns as in ``make_rows`` and three categories, each on exactly a third of the rows (so
    the fitted energy treats them alike), independent of the numbers: none of them is anomalous."""
    rows = make_rows(n, seed)
    rows["category"] = np.random.default_rng(seed + 100).permutation(np.resize(LEVELS, n))
    return rows


@pytest.fixture(scope="module")
def uniform_detector() -> EnergyAnomalyDetector:
    rows = uniform_category_rows(1485, 30)
    casino = make_rows(15, 35).assign(category="casino")  # 1 %: a rare level with its own indicator column
    return EnergyAnomalyDetector(quick_config()).fit(pd.concat([rows, casino], ignore_index=True))


def category_attributions(detector: EnergyAnomalyDetector, rows: pd.DataFrame) -> tuple[Tensor, Tensor]:
    """Raw-column attributions (N, 4) of ``rows`` against the detector's typical row, and that row."""
    assert detector.energy is not None
    reference = reference_row(detector.preprocessor, detector.energy)
    x = detector.transform(rows)
    _, attributions = score_and_attribute(detector.energy, x, reference=reference)
    return to_raw_columns(attributions, detector.preprocessor.encoded_source, 4), reference


def test_a_common_category_is_rarely_the_top_reason(uniform_detector: EnergyAnomalyDetector) -> None:
    rows = uniform_category_rows(1000, 31)
    raw, _ = category_attributions(uniform_detector, rows)
    category = uniform_detector.feature_names_in_.index("category")
    # Against "no category at all" (x = 0) every level was credited ≈ log(3) ≈ 1.1 and the category was
    # reason_1 for about half of such rows; against the modal level it is ≈ 0 for every common level.
    assert (raw.argmax(1) == category).float().mean() < 0.10
    assert raw[:, category].abs().median() < 0.1  # the learned residual's gradient adds a little noise


def test_a_rare_or_unseen_category_raises_the_energy(uniform_detector: EnergyAnomalyDetector) -> None:
    rows = uniform_category_rows(40, 32)
    rows["category"] = ["casino", "lottery"] * 20  # 1 % of the training rows / never seen ("other")
    raw, _ = category_attributions(uniform_detector, rows)
    category = uniform_detector.feature_names_in_.index("category")
    assert (raw[:, category] > 2.0).all()
    assert (raw.argmax(1) == category).float().mean() > 0.9


def test_the_typical_row_is_the_median_and_the_modal_level(uniform_detector: EnergyAnomalyDetector) -> None:
    assert uniform_detector.energy is not None
    preprocessor, marginal = uniform_detector.preprocessor, uniform_detector.energy.marginal
    reference = reference_row(preprocessor, uniform_detector.energy)
    names = preprocessor.encoded_names
    block = [j for j, name in enumerate(names) if name.startswith("category=")]
    numeric = [j for j in range(len(names)) if j not in block]
    assert (reference[numeric] == 0).all()  # the numeric columns' medians
    # The category block is a real row's: one level's scaled indicator vector, a common level's.
    one_hot = reference[block] * preprocessor.scale[block] + preprocessor.center[block]
    expected = torch.tensor([0.0] * (len(block) - 1) + [1.0], dtype=torch.float64)
    assert torch.allclose(one_hot.sort().values, expected)
    assert names[block[int(one_hot.argmax())]] in {f"category={level}" for level in LEVELS}
    # The marginal energy of the category, relative to the typical row, is 0 for its level, ≥ 0 for all.
    rows = make_rows(5, 36).assign(category=[*LEVELS, "casino", "lottery"])
    x = uniform_detector.transform(rows)
    with torch.no_grad():
        block_energy = marginal.per_feature(x)[:, block].sum(1)
        gap = block_energy - marginal.per_feature(reference[None].float())[:, block].sum(1)
    typical = names[block[int(one_hot.argmax())]].removeprefix("category=")
    assert gap[rows["category"].tolist().index(typical)] == 0
    assert (gap >= 0).all() and (gap[3:] > 2).all()


def test_integrated_gradients_add_up_to_the_score_above_the_typical_row(
    uniform_detector: EnergyAnomalyDetector,
) -> None:
    assert uniform_detector.energy is not None
    energy = copy.deepcopy(uniform_detector.energy).double()
    reference = reference_row(uniform_detector.preprocessor, energy)
    x = uniform_detector.transform(uniform_category_rows(64, 34)).double()
    attributions = attribute(energy, x, method="integrated_gradients", n_steps=256, reference=reference)
    with torch.no_grad():
        gap = energy(x) - energy(reference[None])
    assert torch.allclose(attributions.sum(1), gap, atol=0.02 * gap.abs().max().item())
    scores, fast = score_and_attribute(energy, x, reference=reference)
    assert torch.allclose(scores, energy(x).detach())
    assert torch.allclose(fast, attribute(energy, x, method="gradient_x_input", reference=reference))


@pytest.mark.parametrize("n_steps", [0, -2, True, 2.0, "16"])
def test_integrated_gradients_refuse_a_number_of_steps_that_is_not_a_positive_int(
    detector: EnergyAnomalyDetector, n_steps: object
) -> None:
    # n_steps = 0 averaged no gradients: every attribution came back NaN, with no error
    energy = detector.energy
    assert energy is not None and len(energy.members) and energy.scale != 0
    x = detector.transform(make_rows(3, 40))
    with pytest.raises(ValueError, match=f"^n_steps must be an int ≥ 1, got {n_steps!r} "):
        attribute(energy, x, method="integrated_gradients", n_steps=n_steps)  # type: ignore[arg-type]
    assert torch.isfinite(attribute(energy, x, method="integrated_gradients", n_steps=1)).all()


def test_scored_reasons_are_measured_from_the_typical_row(uniform_detector: EnergyAnomalyDetector) -> None:
    # score_frame is what `ebm score` and the served model write: it must pass the typical row too
    from ebm.anomaly.scoring import score_frame

    rows = uniform_category_rows(1000, 33)
    scored = score_frame(uniform_detector, rows, top_k=1, reasons="all")
    assert (scored["reason_1"] == "category").mean() < 0.10
    rare = uniform_category_rows(20, 34).assign(category="casino")
    rare_reasons = score_frame(uniform_detector, rare, top_k=1, reasons="all")["reason_1"]
    assert (rare_reasons == "category").mean() > 0.9


def test_category_codes_score_the_same_as_ints_floats_arrow_ints_or_text() -> None:
    # before: codes fitted as ints and scored as floats (after a join or fillna) read "5411.0", so every
    # row was an unseen category and flagged; Arrow int codes crashed with an AttributeError
    import pyarrow as pa

    train = make_rows(600, 0).assign(mcc=np.random.default_rng(0).choice([5411, 5812, 4111], 600))
    config = quick_config(steps=5, preprocess=PreprocessConfig(categorical_columns=("category", "mcc")))
    detector = EnergyAnomalyDetector(config).fit(train)
    test = make_rows(50, 1).assign(mcc=np.random.default_rng(1).choice([5411, 5812, 4111], 50))
    expected = detector.decision_function(test)
    for codes in (
        test.mcc.astype(float),
        test.mcc.astype(str),
        test.mcc.astype(pd.ArrowDtype(pa.int64())),
    ):
        np.testing.assert_allclose(detector.decision_function(test.assign(mcc=codes)), expected, rtol=1e-6)


def test_a_bool_column_scores_the_same_as_text_or_python_bools() -> None:
    # before: True/False as text (a CSV written by pandas) or in an object array were "non-numeric"
    train = make_rows(600, 0).assign(flag=np.random.default_rng(0).random(600) < 0.3)
    detector = EnergyAnomalyDetector(quick_config(steps=5)).fit(train)
    test = make_rows(50, 1).assign(flag=np.random.default_rng(1).random(50) < 0.3)
    expected = detector.decision_function(test)
    np.testing.assert_allclose(detector.decision_function(test.assign(flag=test.flag.astype(str))), expected)
    np.testing.assert_allclose(detector.decision_function(test.to_numpy()), expected, rtol=1e-6)
