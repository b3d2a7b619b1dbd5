"""Schedule the pipeline flow: a cron deployment that never runs twice at once.

The schedule is ``schedule.cron`` in ``params.yaml`` (default ``"0 2 * * *"``), in ``schedule.timezone``
(IANA name, default UTC). At most one run of the deployment is active; a run due while another is still
going is cancelled rather than queued (the next one would only find the same work done, or the DVC lock
held).

Schedules need a Prefect server (the temporary one a plain flow run starts has no scheduler). Locally, with
the offline switches of ``ebm.offline`` exported::

    export DO_NOT_TRACK=true PREFECT_SERVER_ANALYTICS_ENABLED=false \\
        MLFLOW_DISABLE_TELEMETRY=true DVC_NO_ANALYTICS=1
    prefect server start --host 127.0.0.1 --port 4200            # terminal 1: API, UI, scheduler
    export PREFECT_API_URL=http://127.0.0.1:4200/api             # terminal 2, in the project root:
    python -m flows.deploy                                        # serves the flow until Ctrl-C
    prefect deployment run 'ebm-pipeline/nightly'                 # optional: run now, off-schedule

Stop ``python -m flows.deploy`` before the server (it pauses its schedule on the way out).

To hand runs to workers instead of this process, create a work pool, start a worker on the machines that
should run the stages, and deploy to the pool::

    prefect work-pool create ebm-process --type process
    prefect worker start --pool ebm-process                       # on the machine with the project
    python -m flows.deploy --work-pool ebm-process                # runs from this checkout's path

    prefect work-pool create ebm-k8s --type kubernetes            # needs `pip install prefect-kubernetes`
    prefect worker start --pool ebm-k8s                           # anywhere with cluster access
    python -m flows.deploy --work-pool ebm-k8s --image registry.example/ebm-pipeline:1.0

With ``--image`` the deployment uses ``flow.deploy(work_pool_name=..., image=..., build=False)``: the image
must already hold the project (code, ``dvc.yaml``, a DVC remote configured for the data) at its working
directory. Without it, ``flow.from_source(<project root>, "flows/pipeline.py:pipeline").deploy(...)``
registers this checkout's path, which suits a process worker on the same machine.
"""

from ebm.offline import apply_offline_env

apply_offline_env()

import argparse  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, cast  # noqa: E402

from prefect import Flow, serve  # noqa: E402
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy  # noqa: E402
from prefect.client.schemas.schedules import CronSchedule  # noqa: E402
from prefect.deployments.runner import RunnerDeployment  # noqa: E402
from prefect.schedules import Cron, Schedule  # noqa: E402

from flows.pipeline import load_schedule_config, pipeline  # noqa: E402

DEFAULT_CRON = "0 2 * * *"
DEPLOYMENT_NAME = "nightly"
PROJECT_ROOT = Path(__file__).resolve().parent.parent
ONE_AT_A_TIME = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW)


def load_schedule(project_root: Path) -> Schedule:
    """The cron schedule in ``params.yaml`` (``schedule.cron``, ``schedule.timezone``), validated.

    Raises:
        ValueError: ``schedule`` is not a mapping or has a key other than ``cron``, ``timezone`` and
            ``stages`` (a misspelt ``timezone`` would otherwise leave the deployment on UTC unnoticed).
        pydantic.ValidationError: The cron string or the timezone is not valid.
    """
    section = load_schedule_config(project_root)
    checked = CronSchedule(cron=section.get("cron", DEFAULT_CRON), timezone=section.get("timezone"))
    return Cron(checked.cron, timezone=checked.timezone)


def nightly_deployment(project_root: Path) -> RunnerDeployment:
    """The deployment ``python -m flows.deploy`` serves: the cron schedule, one run at a time."""
    root = Path(project_root).resolve()
    deployment = pipeline.to_deployment(
        name=DEPLOYMENT_NAME,
        schedules=[load_schedule(root)],
        concurrency_limit=ONE_AT_A_TIME,
        parameters={"project_root": str(root)},
    )
    # Called synchronously, to_deployment returns the deployment (its type also admits a coroutine).
    return cast(RunnerDeployment, deployment)


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python -m flows.deploy [--work-pool POOL [--image IMAGE]]``."""
    parser = argparse.ArgumentParser(prog="python -m flows.deploy", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--project-root", type=Path, default=PROJECT_ROOT, help="DVC project to run (default %(default)s)"
    )
    parser.add_argument("--work-pool", help="deploy to this work pool instead of serving from here")
    parser.add_argument("--image", help="with --work-pool: a prebuilt image holding the project")
    args = parser.parse_args(argv)
    root = args.project_root.resolve()

    if args.work_pool is None:
        serve(nightly_deployment(root))
        return
    options: dict[str, Any] = {
        "name": DEPLOYMENT_NAME,
        "work_pool_name": args.work_pool,
        "schedules": [load_schedule(root)],
        "concurrency_limit": ONE_AT_A_TIME,
    }
    if args.image is None:
        # Called synchronously, from_source returns the flow itself.
        from_checkout = cast(
            "Flow[..., Any]", pipeline.from_source(source=str(root), entrypoint="flows/pipeline.py:pipeline")
        )
        from_checkout.deploy(**options, parameters={"project_root": str(root)})
    else:
        # The image runs the flow from its working directory, which holds the project.
        in_image = {"project_root": "."}
        pipeline.deploy(**options, image=args.image, build=False, push=False, parameters=in_image)


if __name__ == "__main__":
    main()
