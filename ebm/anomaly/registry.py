"""Registration of the detector in the MLflow Model Registry (MLflow imported only inside functions).

:func:`register_detector` implements the registry policy of ``DESIGN.md``:

- **No double registration.** A detector's *content hash* (:func:`detector_hash`: tensors and
  settings, not file bytes or metadata) is stored as the version tag ``model_hash``. When the same
  model comes back (DVC restoring it from its run cache, a rerun with identical inputs), the existing
  version is reused and nothing new is logged.
- **Champion only on improvement.** Each version carries its validation metric as the tag
  ``validation_<metric>`` (higher is better). The alias ``champion`` moves to the new version only
  if it beats the current champion's value strictly; otherwise the version gets the tag
  ``champion_decision`` saying why not, and the outcome says so too.
- **Only comparable values decide.** A non-finite metric (NaN, ±inf) is refused with ``ValueError``
  before anything is logged. A champion that has no finite ``validation_<metric>`` tag (it was
  registered under another metric, ``anomaly.register.metric`` having changed since, or with a value
  stored before finiteness was checked) cannot be compared: the alias stays where it is and
  ``champion_decision`` says why, so the register stage still succeeds; move the alias by hand
  (``MlflowClient().set_registered_model_alias``) once you have compared the versions.

``models:/ebm-anomaly-detector@champion`` then loads with ``mlflow.pyfunc.load_model`` anywhere MLflow
and torch are installed (the ``ebm`` package travels inside the model).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Any

import pandas as pd
import torch

from ebm.checkpoint import load_checkpoint
from ebm.offline import apply_offline_env

CHAMPION = "champion"
HASH_TAG = "model_hash"


@dataclass(frozen=True)
class RegistrationOutcome:
    """What :func:`register_detector` did."""

    model_name: str
    version: str
    model_hash: str
    reused: bool
    alias_moved: bool
    champion_version: str
    metric_name: str
    metric_value: float
    decision: str

    @property
    def model_uri(self) -> str:
        return f"models:/{self.model_name}/{self.version}"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "model_uri": self.model_uri}


def detector_hash(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a saved detector's content: every tensor's dtype, shape and bytes plus the settings."""
    state = load_checkpoint(path)
    state.pop("metadata", None)
    digest = hashlib.sha256()
    _update(digest, state)
    return digest.hexdigest()


def _update(digest: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"tensor:{tensor.dtype}:{tuple(tensor.shape)}:".encode())
        digest.update(tensor.numpy().tobytes() if tensor.numel() else b"")
    elif isinstance(value, dict):
        for key in sorted(value, key=str):
            digest.update(f"key:{key}:".encode())
            _update(digest, value[key])
    elif isinstance(value, list | tuple):
        digest.update(f"list:{len(value)}:".encode())
        for item in value:
            _update(digest, item)
    else:
        digest.update(f"value:{json.dumps(value, sort_keys=True, default=str)}:".encode())


def register_detector(
    detector_path: str | os.PathLike[str],
    example: pd.DataFrame,
    *,
    metric_name: str,
    metric_value: float,
    model_name: str = "ebm-anomaly-detector",
    run_id: str | None = None,
) -> RegistrationOutcome:
    """Register the saved detector (or reuse its version) and apply the champion policy.

    Args:
        detector_path: a file written by ``EnergyAnomalyDetector.save``.
        example: a few raw rows: the model's input example and the source of its signature.
        metric_name: the validation metric deciding the champion (higher is better), e.g. ``auprc``.
        metric_value: this detector's value of it; must be finite.
        model_name: the registered model.
        run_id: the MLflow run to log the model into (default: the active run, else a new one).

    Raises:
        ValueError: ``metric_value`` is NaN or infinite (nothing is logged or registered).
    """
    if not math.isfinite(float(metric_value)):
        raise ValueError(
            f"register_detector: validation metric {metric_name!r} of {os.fspath(detector_path)} is "
            f"{metric_value!r}; a non-finite value cannot be compared with the champion's, so the "
            "detector is not registered (check the evaluation that produced it)"
        )
    apply_offline_env()  # before MLflow's tracking client starts: its telemetry must stay off
    import mlflow
    from mlflow import MlflowClient

    from ebm.anomaly.pyfunc import log_detector_model

    client = MlflowClient()
    model_hash = detector_hash(detector_path)
    metric_tag = f"validation_{metric_name}"
    version = _version_with_hash(client, model_name, model_hash)
    reused = version is not None
    if version is None:
        active = mlflow.active_run()
        if active is not None and (run_id is None or active.info.run_id == run_id):
            info = log_detector_model(detector_path, example)
        else:
            with mlflow.start_run(run_id=run_id):
                info = log_detector_model(detector_path, example)
        registered = mlflow.register_model(
            info.model_uri, model_name, tags={HASH_TAG: model_hash, metric_tag: repr(float(metric_value))}
        )
        version = str(registered.version)
    else:
        stored = _finite_tag(client.get_model_version(model_name, version).tags, metric_tag)
        metric_value = stored if stored is not None else float(metric_value)

    champion = _champion(client, model_name)
    if champion is None:
        moved, decision = True, f"v{version} is the first champion ({metric_name} {metric_value:.4f})"
    elif str(champion.version) == version:
        moved, decision = False, f"v{version} is already the champion"
    elif (best := _finite_tag(champion.tags, metric_tag)) is None:
        moved = False
        found = champion.tags.get(metric_tag)
        why = (
            f"has no {metric_tag} tag (registered under another metric?)"
            if found is None
            else f"has {metric_tag}={found!r}, not a finite number"
        )
        decision = (
            f"kept champion v{champion.version}: it {why}, so v{version} ({metric_name} {metric_value:.4f}) "
            f"cannot be compared with it; compare them and move the alias {CHAMPION!r} by hand"
        )
    else:
        moved = metric_value > best
        decision = (
            f"v{version} ({metric_name} {metric_value:.4f}) beats champion v{champion.version} ({best:.4f})"
            if moved
            else f"kept champion v{champion.version}: its {metric_name} {best:.4f} "
            f"≥ v{version}'s {metric_value:.4f}"
        )
    if moved:
        client.set_registered_model_alias(model_name, CHAMPION, version)
    if reused:
        decision = f"same model as v{version} (hash {model_hash[:12]}), not registered again; {decision}"
    client.set_model_version_tag(model_name, version, "champion_decision", decision)
    return RegistrationOutcome(
        model_name=model_name,
        version=version,
        model_hash=model_hash,
        reused=reused,
        alias_moved=moved,
        champion_version=version if moved else (str(champion.version) if champion is not None else version),
        metric_name=metric_name,
        metric_value=float(metric_value),
        decision=decision,
    )


def _finite_tag(tags: dict[str, str], tag: str) -> float | None:
    """The tag's value as a finite float, or ``None`` when it is missing, not a number, NaN or infinite."""
    try:
        value = float(tags[tag])
    except (KeyError, TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _version_with_hash(client: Any, model_name: str, model_hash: str) -> str | None:
    for version in client.search_model_versions(f"name = '{model_name}'"):
        if version.tags.get(HASH_TAG) == model_hash:
            return str(version.version)
    return None


def _champion(client: Any, model_name: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException:
        return None
