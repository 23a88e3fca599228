"""MLflow entry point `evaluate`: score a model on a split recorded by its training run."""

import click
import mlflow

from sceneml.cli import setup_logging, user_errors_as_one_line
from sceneml.evaluation import evaluate_model
from sceneml.tracking import failure_marks_run, init_store, launched_by_mlflow_run


@click.command()
@click.option("--model-uri", default="models:/sceneml@champion")
@click.option("--data", default="", help="default: the data the model was trained on")
@click.option("--split", default="test")
@click.option("--device", default="auto")
@user_errors_as_one_line
def main(model_uri, data, split, device) -> None:
    setup_logging()
    init_store()
    with mlflow.start_run(run_id=launched_by_mlflow_run(), run_name="evaluate") as run:
        with failure_marks_run(run.info.run_id):
            metrics = evaluate_model(model_uri, data, split, device)
    print({k: round(v, 4) for k, v in metrics.items() if not k.startswith(f"{split}_a")})


if __name__ == "__main__":
    main()
