"""MLflow entry point `predict`: class and probabilities for an image file or folder, as CSV."""

from pathlib import Path

import click
import mlflow

from sceneml.cli import setup_logging, user_errors_as_one_line
from sceneml.predict import image_files, predict_files
from sceneml.tracking import init_store, launched_by_mlflow_run, set_tags


@click.command()
@click.option("--model-uri", default="models:/sceneml@champion")
@click.option("--input", "input_path", required=True, help="an image file or a folder of images")
@click.option("--output", default="predictions.csv", help="CSV path (relative paths: to the current folder)")
@click.option("--device", default="auto")
@user_errors_as_one_line
def main(model_uri: str, input_path: str, output: str, device: str) -> None:
    setup_logging()
    init_store()
    files = image_files(input_path)
    table = predict_files(model_uri, files, device)
    out = Path(output).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False, float_format="%.17g")
    n_bad = int((table["error"] != "").sum())
    run_id = launched_by_mlflow_run()
    if run_id:  # `mlflow run` opened a run for us: keep the predictions with it
        with mlflow.start_run(run_id=run_id):
            mlflow.log_artifact(str(out))
            set_tags(run_id, {"sceneml.predicted_images": len(table), "sceneml.unreadable_images": n_bad})
    print(f"{len(table)} images -> {out}" + (f" ({n_bad} unreadable: see the error column)" if n_bad else ""))


if __name__ == "__main__":
    main()
