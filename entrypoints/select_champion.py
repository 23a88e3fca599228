"""MLflow entry point `select` (file named so it does not shadow the stdlib `select` module)."""

import click
import mlflow

from sceneml.cli import setup_logging, user_errors_as_one_line
from sceneml.errors import SceneMLError
from sceneml.registry import select_champion
from sceneml.tracking import failure_marks_run, init_store, launched_by_mlflow_run


@click.command()
@click.option("--experiment", default="", help="experiment name; default: the active one")
@click.option("--parent-run-id", default="", help="restrict to the children of one study")
@click.option("--select-metric", default="val_mean_class_acc")
@click.option("--model-name", default="sceneml")
@click.option("--alias", default="champion")
@user_errors_as_one_line
def main(experiment, parent_run_id, select_metric, model_name, alias) -> None:
    setup_logging()
    init_store()
    with mlflow.start_run(run_id=launched_by_mlflow_run(), run_name="select") as run:
        with failure_marks_run(run.info.run_id):
            if experiment:
                exp = mlflow.get_experiment_by_name(experiment)
                if exp is None:
                    raise SceneMLError(f"experiment {experiment!r} does not exist")
                ids = [exp.experiment_id]
            else:
                ids = [run.info.experiment_id]
            version, best = select_champion(ids, select_metric, model_name, alias, parent_run_id or None)
            print(f"{model_name}@{alias} -> version {version.version} (run {best.run_id}, epoch {best.epoch}, "
                  f"{select_metric}={best.value:.4f})")


if __name__ == "__main__":
    main()
