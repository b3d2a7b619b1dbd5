"""The params.yaml → frozen dataclass path: coercion, errors that name the key, and round trips."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml

from ebm.config import ConfigError, from_dict, load_params, section, to_dict
from ebm.energies import MLPEnergyConfig
from ebm.samplers import SamplerConfig
from ebm.trainer import TrainConfig


@dataclass(frozen=True)
class RunConfig:
    """A run config composed of the library's component configs, as a stage would declare it."""

    train: TrainConfig = field(default_factory=TrainConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    energy: MLPEnergyConfig = field(default_factory=MLPEnergyConfig)
    mode: Literal["cd", "pcd"] = "pcd"
    buffer_size: int | None = None
    name: str = "run"


def test_from_dict_builds_nested_dataclasses_and_coerces_lists_and_ints() -> None:
    values = {
        "train": {"steps": 10, "lr": 1, "betas": [0, 0.9], "grad_clip": None, "ema_decay": 0},
        "sampler": {"name": "mala", "step_size": 1},
        "energy": {"widths": [8, 4]},
        "mode": "cd",
        "buffer_size": 100,
    }

    config = from_dict(RunConfig, values)

    assert config == RunConfig(
        train=TrainConfig(steps=10, lr=1.0, betas=(0.0, 0.9), grad_clip=None, ema_decay=0.0),
        sampler=SamplerConfig(name="mala", step_size=1.0),
        energy=MLPEnergyConfig(widths=(8, 4)),
        mode="cd",
        buffer_size=100,
    )
    assert type(config.train.lr) is float
    assert type(config.train.ema_decay) is float
    assert type(config.sampler.step_size) is float
    assert config.train.betas == (0.0, 0.9)
    assert all(type(beta) is float for beta in config.train.betas)
    assert config.energy.widths == (8, 4)
    assert isinstance(config.energy.widths, tuple)
    hash(config)  # frozen and built from tuples only, so hashable


def test_missing_keys_keep_their_defaults() -> None:
    assert from_dict(RunConfig, None) == RunConfig()
    assert from_dict(RunConfig, {}) == RunConfig()
    assert from_dict(RunConfig, {"train": {"steps": 3}}) == RunConfig(train=TrainConfig(steps=3))


def test_a_nested_section_given_in_part_keeps_the_parents_defaults_not_its_own_class() -> None:
    # before: toy: {train: {steps: 2000}} swapped the 2D recipe's lr, schedule and EMA for TrainConfig()'s,
    # and the quick params ran the toy sets with SiLU and β₁ = 0 because they left those keys out
    from ebm.toy import Toy2DConfig

    recipe = Toy2DConfig()
    config = from_dict(Toy2DConfig, {"train": {"steps": 2000}, "sampler": {"step_size": 0.03}}, "toy")
    assert config.train == dataclasses.replace(recipe.train, steps=2000)
    assert config.sampler == dataclasses.replace(recipe.sampler, step_size=0.03)
    assert config.model == recipe.model and config.loss == recipe.loss
    base = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, lr=0.1))
    assert from_dict(Toy2DConfig, {"train": {"steps": 5}}, base=base).train.lr == 0.1
    with pytest.raises(ConfigError, match=r"toy\.train\.stpes"):
        from_dict(Toy2DConfig, {"train": {"stpes": 5}}, "toy")


def test_optional_fields_take_none_or_a_value() -> None:
    config = from_dict(RunConfig, {"buffer_size": None, "sampler": {"clamp": [-2, 2], "noise_scale": None}})
    assert config.buffer_size is None
    assert config.sampler.noise_scale is None
    assert config.sampler.clamp == (-2.0, 2.0)
    assert all(type(bound) is float for bound in config.sampler.clamp)


@pytest.mark.parametrize(
    ("values", "fragments"),
    [
        pytest.param({"trian": {}}, ["'trian'", "valid keys"], id="unknown_top_level_key"),
        pytest.param({"train": {"stepz": 1}}, ["'train.stepz'", "valid keys"], id="unknown_nested_key"),
        pytest.param({"train": {"steps": 1.5}}, ["train.steps", "integer"], id="float_for_int"),
        pytest.param({"train": {"steps": True}}, ["train.steps", "integer"], id="bool_for_int"),
        pytest.param({"train": {"lr": "fast"}}, ["train.lr", "number", "'fast'"], id="str_for_float"),
        pytest.param({"train": {"lr": None}}, ["train.lr", "number"], id="none_for_required_float"),
        pytest.param({"train": {"grad_clip": "x"}}, ["train.grad_clip", "number"], id="str_for_optional"),
        pytest.param({"train": {"progress": "yes"}}, ["train.progress", "bool"], id="str_for_bool"),
        pytest.param({"train": {"betas": [0.5]}}, ["train.betas", "2 entries"], id="tuple_too_short"),
        pytest.param({"train": {"betas": [0.5, "x"]}}, ["train.betas[1]", "number"], id="tuple_item"),
        pytest.param({"train": {"betas": 0.5}}, ["train.betas", "list"], id="scalar_for_tuple"),
        pytest.param({"sampler": {"clamp": [0, 1, 2]}}, ["sampler.clamp", "2 entries"], id="optional_tuple"),
        pytest.param({"energy": {"widths": "16"}}, ["energy.widths", "list"], id="str_for_sequence"),
        pytest.param({"energy": {"widths": [16, 1.5]}}, ["energy.widths[1]", "integer"], id="sequence_item"),
        pytest.param({"mode": "sgd"}, ["mode", "one of ['cd', 'pcd']", "'sgd'"], id="literal"),
        pytest.param({"name": 3}, ["name", "str"], id="int_for_str"),
        pytest.param({"train": 3}, ["train must be a mapping"], id="scalar_for_dataclass"),
        pytest.param({"train": {"steps": -1}}, ["train:", "steps ≥ 0"], id="dataclass_validation"),
    ],
)
def test_bad_values_raise_config_error_naming_the_dotted_path(
    values: dict[str, Any], fragments: list[str]
) -> None:
    with pytest.raises(ConfigError) as raised:
        from_dict(RunConfig, values)
    for fragment in fragments:
        assert fragment in str(raised.value)


def test_unknown_key_error_lists_every_valid_key() -> None:
    with pytest.raises(ConfigError) as raised:
        from_dict(RunConfig, {"train": {"stepz": 1}})
    for valid in dataclasses.fields(TrainConfig):
        assert repr(valid.name) in str(raised.value)


def test_top_level_validation_error_names_the_class() -> None:
    with pytest.raises(ConfigError, match="TrainConfig"):
        from_dict(TrainConfig, {"batch_size": 0})
    with pytest.raises(ConfigError, match="TrainConfig must be a mapping"):
        from_dict(TrainConfig, [1, 2])  # type: ignore[arg-type]


def test_from_dict_rejects_a_class_that_is_not_a_dataclass() -> None:
    with pytest.raises(TypeError, match="not a dataclass"):
        from_dict(dict, {})


NON_DEFAULT_RUN = RunConfig(
    train=TrainConfig(steps=7, lr=0.25, betas=(0.5, 0.99), grad_clip=None, ema_decay=0.9, progress=False),
    sampler=SamplerConfig(name="langevin", step_size=0.1, noise_scale=0.01, clamp=(-3.0, 3.0)),
    energy=MLPEnergyConfig(widths=(16, 16), spectral_norm=True),
    mode="cd",
    buffer_size=64,
    name="tiny",
)


def test_to_dict_gives_plain_data_that_from_dict_turns_back_into_the_config() -> None:
    plain = to_dict(NON_DEFAULT_RUN)

    assert plain["train"]["betas"] == [0.5, 0.99]
    assert plain["sampler"]["clamp"] == [-3.0, 3.0]
    assert plain["energy"]["widths"] == [16, 16]
    assert yaml.safe_load(yaml.safe_dump(plain)) == plain  # safe_dump refuses tuples and objects
    assert from_dict(RunConfig, plain) == NON_DEFAULT_RUN


def test_params_file_section_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"toy": {"run": to_dict(NON_DEFAULT_RUN)}, "seed": 3}))

    params = load_params(path)

    assert from_dict(RunConfig, section(params, "toy.run"), "toy.run") == NON_DEFAULT_RUN
    assert section(params, "toy.run.train.lr") == 0.25
    assert section(params, "seed") == 3


def test_errors_from_a_params_section_name_the_full_path(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("toy:\n  run:\n    train:\n      stepz: 3\n")
    with pytest.raises(ConfigError, match=r"'toy\.run\.train\.stepz'"):
        from_dict(RunConfig, section(load_params(path), "toy.run"), "toy.run")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        pytest.param(None, "no params file", id="missing"),
        pytest.param("train: [1, 2\n", "not valid YAML", id="invalid_yaml"),
        pytest.param("- 1\n- 2\n", "mapping at the top level, got list", id="list"),
        pytest.param("", "mapping at the top level, got NoneType", id="empty"),
        pytest.param("just a string\n", "mapping at the top level, got str", id="scalar"),
    ],
)
def test_load_params_errors_name_the_file(tmp_path: Path, text: str | None, fragment: str) -> None:
    path = tmp_path / "params.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError) as raised:
        load_params(path)
    assert str(path) in str(raised.value)
    assert fragment in str(raised.value)


@pytest.mark.parametrize(
    ("dotted", "missing"),
    [
        pytest.param("eval", "'eval'", id="top_level"),
        pytest.param("toy.eval", "'toy.eval'", id="nested"),
        pytest.param("toy.train.lr.value", "'toy.train.lr.value'", id="below_a_scalar"),
    ],
)
def test_section_errors_name_the_missing_key(dotted: str, missing: str) -> None:
    params = {"toy": {"train": {"lr": 0.1}}}
    with pytest.raises(ConfigError, match="params has no key") as raised:
        section(params, dotted)
    assert missing in str(raised.value)


def test_the_library_default_2d_recipe_is_the_one_params_yaml_ships() -> None:
    """`ebm train` without --params and `benchmarks/toy_density.py` use `Toy2DConfig()`; the pipeline
    reads params.yaml. Both must train the same recipe, or the benchmark measures a different model."""
    from ebm.toy import Toy2DConfig

    toy = dict(section(load_params(Path(__file__).parents[1] / "params.yaml"), "toy"))
    for key in ("datasets", "n_train", "n_test"):
        toy.pop(key)
    shipped = from_dict(Toy2DConfig, toy, "toy")
    assert to_dict(Toy2DConfig()) == to_dict(shipped)


def _with(section_name: str, **changes: Any) -> dict[str, Any]:
    """The shipped params.yaml with keys of one section changed (``...`` deletes a key)."""
    raw = load_params(Path(__file__).parents[1] / "params.yaml")
    values = {**raw[section_name], **changes}
    raw[section_name] = {key: value for key, value in values.items() if value is not ...}
    return raw


def _toy_subsection(name: str, **changes: Any) -> dict[str, Any]:
    return {name: {**load_params(Path(__file__).parents[1] / "params.yaml")["toy"][name], **changes}}


@pytest.mark.parametrize(
    ("changes", "fragments"),
    [
        pytest.param({"n_train": 2000.9}, ["toy.n_train", "integer", "2000.9"], id="float_n_train"),
        pytest.param({"n_test": True}, ["toy.n_test", "integer", "True"], id="bool_n_test"),
        pytest.param({"n_train": "2e4"}, ["toy.n_train", "integer", "'2e4'"], id="str_n_train"),
        pytest.param({"n_test": -5}, ["toy:", "n_test", "≥ 1", "-5"], id="negative_n_test"),
        pytest.param({"n_train": 0}, ["toy:", "n_train", "≥ 1", "0"], id="zero_n_train"),
        pytest.param({"datasets": ...}, ["params has no key 'toy.datasets'"], id="missing_datasets"),
        pytest.param({"n_test": ...}, ["params has no key 'toy.n_test'"], id="missing_n_test"),
        pytest.param({"datasets": "moons"}, ["toy.datasets", "must be a list", "'moons'"], id="str_datasets"),
        pytest.param({"datasets": []}, ["toy:", "datasets", "non-empty"], id="no_datasets"),
        pytest.param({"datasets": ["moons", "mons"]}, ["toy:", "datasets", "'mons'", "moons"], id="unknown"),
        pytest.param({"datasets": ["moons", "moons"]}, ["toy:", "datasets", "twice"], id="duplicate"),
        pytest.param({"datasets": ["moons", 3]}, ["toy.datasets[1]", "str"], id="int_dataset"),
        # before: buffer_size 0 failed in the train stage as "capacity must be ≥ 1", in_features 3 as a
        # matrix-shape RuntimeError, reinit_prob 1.5 and n_steps 0 without the toy.loss prefix
        pytest.param(
            _toy_subsection("loss", buffer_size=0), ["toy.loss", "buffer_size", "≥ 1", "0"], id="buffer"
        ),
        pytest.param(
            _toy_subsection("loss", reinit_prob=1.5), ["toy.loss", "reinit_prob", "1.5"], id="reinit"
        ),
        pytest.param(_toy_subsection("loss", n_steps=0), ["toy.loss", "n_steps", "≥ 1"], id="n_steps"),
        pytest.param(_toy_subsection("loss", alpha=-1.0), ["toy.loss", "alpha", "-1.0"], id="alpha"),
        pytest.param(
            _toy_subsection("model", in_features=3), ["in_features must be 2", "3"], id="in_features"
        ),
    ],
)
def test_bad_toy_params_are_an_error_naming_the_key_before_any_stage_runs(
    changes: dict[str, Any], fragments: list[str]
) -> None:
    from ebm.stages.toy import ToyParams

    with pytest.raises(ConfigError) as raised:
        ToyParams.from_params(_with("toy", **changes))
    for fragment in fragments:
        assert fragment in str(raised.value)


def test_the_shipped_toy_params_still_load() -> None:
    from ebm.stages.toy import ToyParams

    params = ToyParams.from_params(_with("toy", datasets=["moons"], n_train=5, n_test=1))
    assert (params.datasets, params.n_train, params.n_test) == (("moons",), 5, 1)


@pytest.mark.parametrize(
    ("changes", "fragments"),
    [
        pytest.param(
            {"register": {"metric": "aucpr"}},
            ["anomaly.register", "metric", "'aucpr'", "'auprc'"],
            id="misspelt_metric",
        ),
        pytest.param(
            {"evaluate": {"baselines": ["iforest", "iforrest"]}},
            ["anomaly.evaluate", "baselines", "'iforrest'", "'lof'"],
            id="misspelt_baseline",
        ),
        pytest.param(
            {"data": {"train_fraction": 1.0}}, ["anomaly.data", "train_fraction", "1.0"], id="no_test_rows"
        ),
        pytest.param(
            {"data": {"train_fraction": 0.0}}, ["anomaly.data", "train_fraction"], id="no_train_rows"
        ),
        pytest.param(
            {"data": {"n_customers": 5}}, ["anomaly.data", "n_customers must be ≥ 10, got 5"], id="few"
        ),
    ],
)
def test_bad_anomaly_params_are_an_error_naming_the_key_before_any_stage_runs(
    changes: dict[str, Any], fragments: list[str]
) -> None:
    # a misspelt metric used to load, then fail the last stage (register) with a bare KeyError
    from ebm.stages.anomaly import AnomalyParams

    with pytest.raises(ConfigError) as raised:
        AnomalyParams.from_params(_with("anomaly", **changes))
    for fragment in fragments:
        assert fragment in str(raised.value)


def test_every_detection_metric_can_pick_the_champion() -> None:
    from ebm.anomaly.metrics import DetectionMetrics
    from ebm.stages.anomaly import METRIC_NAMES, AnomalyParams

    assert METRIC_NAMES == tuple(f.name for f in dataclasses.fields(DetectionMetrics))
    for metric in METRIC_NAMES:
        assert (
            AnomalyParams.from_params(_with("anomaly", register={"metric": metric})).register.metric == metric
        )


STAGE_FAMILIES = ("toy", "images", "boltzmann", "anomaly")


def family_params_reader(family: str) -> Any:
    """The ``from_params`` of stage family ``family`` (``ebm.stages.<family>``)."""
    import importlib

    stages = importlib.import_module(f"ebm.stages.{family}")
    reader = {"toy": "ToyParams", "images": "ImagesParams", "boltzmann": "BoltzmannParams"}.get(
        family, "AnomalyParams"
    )
    return getattr(stages, reader).from_params


def shipped_params() -> dict[str, Any]:
    return load_params(Path(__file__).resolve().parents[1] / "params.yaml")


@pytest.mark.parametrize("seed", [1.5, True, "7", None])
@pytest.mark.parametrize("family", STAGE_FAMILIES)
def test_every_stage_refuses_a_seed_that_is_not_a_whole_number(family: str, seed: Any) -> None:
    read, params = family_params_reader(family), shipped_params()
    read(params)  # the shipped params load
    with pytest.raises(ConfigError, match=r"^seed must be a whole number, got "):
        read({**params, "seed": seed})  # before: 1.5 silently became 1


@pytest.mark.parametrize("value", [None, [1], "text"])
@pytest.mark.parametrize("family", STAGE_FAMILIES)
def test_every_stage_refuses_a_section_that_is_not_a_mapping_naming_it(family: str, value: Any) -> None:
    # `anomaly: null` ended in "TypeError: 'NoneType' object is not iterable", naming no key
    with pytest.raises(ConfigError, match=rf"^{family} must be a mapping, got "):
        family_params_reader(family)({**shipped_params(), family: value})


@pytest.mark.parametrize("params_file", ["params.yaml", "configs/quick.yaml"])
@pytest.mark.parametrize("family", ["toy", "images", "anomaly", "boltzmann"])
def test_mlflow_gets_each_section_resolved_with_every_value_the_file_gives(
    params_file: str, family: str
) -> None:
    """Stages log ``Params.logged()``: the file's values at the file's keys, plus the defaults it leaves
    out (the section as written would record nothing for those)."""
    from ebm.stages.anomaly import AnomalyParams
    from ebm.stages.boltzmann import BoltzmannParams
    from ebm.stages.images import ImagesParams
    from ebm.stages.toy import ToyParams
    from ebm.tracking import flatten_params

    parse = {"toy": ToyParams, "images": ImagesParams, "anomaly": AnomalyParams, "boltzmann": BoltzmannParams}
    raw = load_params(Path(__file__).resolve().parents[1] / params_file)
    written = flatten_params(raw[family])
    logged = flatten_params(parse[family].from_params(raw).logged())
    assert {key: logged.get(key) for key in written} == written
    assert len(logged) > len(written)  # the defaults the file leaves out are there too
