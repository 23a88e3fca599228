"""MLflow entry point `predict`: class and probabilities for an image file or folder, as CSV."""

import click

from sceneml.cli import setup_logging, user_errors_as_one_line
from sceneml.config import check_device_name


@click.command()
@click.option("--model-uri", default="models:/sceneml@champion")
@click.option("--input", "input_path", required=True, help="an image file or a folder of images")
@click.option("--output", default="predictions.csv", help="CSV path (relative paths: to the current folder)")
@click.option("--device", default="auto")
@user_errors_as_one_line
def main(model_uri: str, input_path: str, output: str, device: str) -> None:
    check_device_name(device)
    setup_logging()
    from sceneml.tasks.predict import predict

    predict(model_uri, input_path, output, device)


if __name__ == "__main__":
    main()
