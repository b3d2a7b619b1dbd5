"""The detector as an MLflow pyfunc model (serving boundary; MLflow is imported only inside functions).

::

    info = log_detector_model("models/anomaly/detector.pt", name="model")   # inside an active run
    model = mlflow.pyfunc.load_model("models:/ebm-anomaly-detector@champion")
    model.predict(frame)            # → anomaly_score, is_anomaly, reason_k, contribution_k

    mlflow models serve -m models:/ebm-anomaly-detector@champion --env-manager local -h 127.0.0.1 -p 5001
    curl -s 127.0.0.1:5001/invocations -H 'Content-Type: application/json' \\
         -d '{"dataframe_records": [{"amount": 12.5, "hour": 3.2, ...}]}'

The model's signature has one column per feature: ``double`` for numeric columns and ``string`` for
categories (the float32 conversion happens inside, at the torch boundary). Over REST the scoring server
casts JSON numbers, integers included, to float64 by the signature before enforcing it. In process,
``model.predict`` enforces the signature as given: a numeric column must be float64 (float32 and int32
are widened); an int64 column is refused (``Incompatible input types ... int64 to float64``) unless every
value in it is 0 or 1, MLflow's one exception — cast it first, ``frame.astype({column: "float64"})``.
The ``top_k`` parameter (default 3) sets how many ``reason_k`` / ``contribution_k`` pairs come back, from
0 to the number of features; the declared output shows the default's columns (MLflow does not enforce
outputs), and a ``top_k`` outside that range is refused with ``MlflowException``.
The model is logged *from code* (``ebm/anomaly/mlflow_model.py``; nothing is pickled) with the ``ebm``
package in ``code_paths``, so it loads wherever MLflow and torch are installed. A malformed
request (missing column, text where a number belongs, NaN/inf, an empty body) is refused by MLflow's
schema enforcement or raises ``MlflowException(INVALID_PARAMETER_VALUE)``; the scoring server answers
either with HTTP 400 and the message, and garbage never reaches the model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from ebm.offline import apply_offline_env

if TYPE_CHECKING:
    from mlflow.models.model import ModelInfo

ARTIFACT_KEY = "detector"  # the same key as in ebm/anomaly/mlflow_model.py
PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # the ebm package, shipped with the model
MODEL_CODE = Path(__file__).with_name("mlflow_model.py")


def make_signature(detector: Any, example: pd.DataFrame) -> Any:
    """Column signature (``double`` per numeric feature, ``string`` per category) and the output's."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    from ebm.anomaly.scoring import score_frame

    columns: list[ColSpec | TensorSpec] = [ColSpec("double", name) for name in detector.schema.numeric]
    columns += [ColSpec("string", name) for name in detector.schema.categorical]
    inputs = Schema(columns)
    scored = score_frame(detector, detector.validate(example), top_k=3, reasons="all")
    outputs = Schema(
        [
            ColSpec(
                "double"
                if pd.api.types.is_float_dtype(dtype)
                else "long"
                if pd.api.types.is_integer_dtype(dtype)
                else "string",
                name,
            )
            for name, dtype in scored.dtypes.items()
        ]
    )
    params = ParamSchema([ParamSpec("top_k", "long", 3)])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def log_detector_model(
    detector_path: str | os.PathLike[str], example: pd.DataFrame, *, name: str = "model"
) -> ModelInfo:
    """Log the saved detector as a pyfunc model in the active MLflow run, with signature and input example."""
    apply_offline_env()  # before MLflow's tracking client starts: its telemetry must stay off
    import mlflow.pyfunc

    from ebm.anomaly.detector import EnergyAnomalyDetector

    detector = EnergyAnomalyDetector.load(detector_path)
    example = detector.validate(example.head(5))[detector.feature_names_in_]
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=os.fspath(MODEL_CODE),
        artifacts={ARTIFACT_KEY: os.fspath(detector_path)},
        code_paths=[os.fspath(PACKAGE_ROOT)],
        signature=make_signature(detector, example),
        input_example=example,
        # Everything the ebm package imports on the way to the detector (ebm.trainer imports tqdm).
        pip_requirements=["torch", "numpy", "pandas", "scipy", "pyarrow", "pyyaml", "tqdm", "mlflow"],
    )
