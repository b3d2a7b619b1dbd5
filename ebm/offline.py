"""Environment switches that keep Prefect, MLflow and DVC from calling home.

Each library checks its switch at a different moment, so apply them before the library is imported:
Prefect starts its SDK analytics thread inside ``import prefect``, MLflow decides on telemetry when its
tracking client starts, DVC reads its switch when a command finishes. Entry points
(``flows/pipeline.py``, ``tests/conftest.py``, ``ebm.tracking.start_run``) call :func:`apply_offline_env`
first thing.

What each switch turns off, as read in the installed sources (Prefect 3.9, MLflow 3.17, DVC 3.67):

- ``DO_NOT_TRACK``: Prefect's client analytics (``prefect/_internal/analytics``) and MLflow's telemetry
  (``mlflow/telemetry/utils.py``).
- ``PREFECT_SERVER_ANALYTICS_ENABLED``: the heartbeat a Prefect server (also the temporary one started
  for a flow run without ``PREFECT_API_URL``) sends to ``sens-o-matic.prefect.io``.
- ``PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT``: upgrade banners the server's UI would fetch.
- ``MLFLOW_DISABLE_TELEMETRY``: MLflow's own telemetry switch (config from ``config.mlflow-telemetry.io``).
- ``DVC_NO_ANALYTICS``: DVC's usage report to ``analytics.dvc.org``.
- ``ITERATIVE_DO_NOT_TRACK``: the ``iterative-telemetry`` package DVC reports through.
- ``DVC_STUDIO_OFFLINE``: live-metrics and experiment notifications to DVC Studio.

DVC's daily version check (``updater.dvc.org``, run by the ``dvc`` command line only) has no environment
switch; turn it off in the repository with ``dvc config core.check_update false`` (and
``dvc config core.analytics false`` for analytics).
"""

import os

OFFLINE_ENV: dict[str, str] = {
    "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "ITERATIVE_DO_NOT_TRACK": "do-not-track",
    "DVC_STUDIO_OFFLINE": "true",
}


def apply_offline_env() -> None:
    """Set every switch in :data:`OFFLINE_ENV` unless the environment already sets it."""
    for name, value in OFFLINE_ENV.items():
        os.environ.setdefault(name, value)
