"""MLflow "model from code" for the detector: MLflow executes this file when it loads the model.

Library code never imports it (it imports mlflow at the top); :func:`ebm.anomaly.pyfunc.log_detector_model`
passes its *path* to ``mlflow.pyfunc.log_model``, so no Python object is pickled into the model: the
model is this source file, the ``ebm`` package (``code_paths``) and the detector's ``weights_only`` file.
"""

from __future__ import annotations

import numbers

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

ARTIFACT_KEY = "detector"


class DetectorModel(PythonModel):
    """Scores a table of transactions: ``anomaly_score``, ``is_anomaly`` and the top reasons."""

    def load_context(self, context):
        from ebm.anomaly.detector import EnergyAnomalyDetector

        self.detector = EnergyAnomalyDetector.load(context.artifacts[ARTIFACT_KEY])

    def predict(self, context, model_input, params=None):
        from ebm.anomaly.scoring import score_frame

        try:
            top_k = (params or {}).get("top_k", 3)
            n_features = len(self.detector.feature_names_in_)
            whole = isinstance(top_k, numbers.Integral) and not isinstance(top_k, bool)
            if not whole or not 0 <= top_k <= n_features:
                raise ValueError(
                    f"top_k must be a whole number from 0 to {n_features} (the features), got {top_k!r}"
                )
            checked = self.detector.validate(_as_frame(model_input))
            scored = score_frame(self.detector, checked, top_k=int(top_k), reasons="all")
            return scored.reset_index(drop=True)
        except (ValueError, TypeError, KeyError) as err:  # ValidationError is a ValueError
            raise MlflowException(f"invalid input: {err}", error_code=INVALID_PARAMETER_VALUE) from err


def _as_frame(model_input):
    if isinstance(model_input, pd.DataFrame):
        return model_input
    if isinstance(model_input, dict) or (
        isinstance(model_input, list) and all(isinstance(row, dict) for row in model_input)
    ):
        return pd.DataFrame(model_input)
    raise TypeError(f"expected a table (DataFrame or records), got {type(model_input).__name__}")


mlflow.models.set_model(DetectorModel())
