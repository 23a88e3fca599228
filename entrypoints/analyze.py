"""MLflow entry point `analyze`: galleries, activation statistics and eigen-spectra of one model."""

import click
import mlflow

from sceneml.analyze import AnalyzeConfig, analyze_model
from sceneml.cli import setup_logging, user_errors_as_one_line
from sceneml.tracking import failure_marks_run, init_store, launched_by_mlflow_run

D = AnalyzeConfig()


@click.command()
@click.option("--model-uri", default=D.model_uri)
@click.option("--data", default=D.data, help="default: the data the model was trained on")
@click.option("--split", default=D.split)
@click.option("--classes", default=D.classes, help="comma list; default all")
@click.option("--k", type=float, default=D.k)
@click.option("--modules", default=D.modules, help="comma list of module names; default five over the depth")
@click.option("--n-images", type=float, default=D.n_images)
@click.option("--compare", default=D.compare, help="comma list of name=path")
@click.option("--top-eigen", type=float, default=D.top_eigen)
@click.option("--device", default=D.device)
@user_errors_as_one_line
def main(k: float, n_images: float, top_eigen: float, **params) -> None:
    setup_logging()
    init_store()
    cfg = AnalyzeConfig(**params, k=int(k), n_images=int(n_images), top_eigen=int(top_eigen)).validate()
    with mlflow.start_run(run_id=launched_by_mlflow_run(), run_name="analyze") as run:
        with failure_marks_run(run.info.run_id):
            metrics = analyze_model(cfg)
    for key, value in sorted(metrics.items()):
        print(f"{key} = {value:.4f}")


if __name__ == "__main__":
    main()
