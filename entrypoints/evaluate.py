"""MLflow entry point `evaluate`: score a model on a split recorded by its training run."""

import click

from sceneml.cli import none_is_empty, setup_logging, user_errors_as_one_line
from sceneml.config import check_device_name


@click.command()
@click.option("--model-uri", default="models:/sceneml@champion")
@click.option("--data", default="", callback=none_is_empty, help="default: the data the model was trained on")
@click.option("--split", default="test")
@click.option("--device", default="auto")
@user_errors_as_one_line
def main(model_uri: str, data: str, split: str, device: str) -> None:
    check_device_name(device)
    setup_logging()
    from sceneml.tasks.evaluate import evaluate

    metrics = evaluate(model_uri, data, split, device)
    print({k: round(v, 4) for k, v in metrics.items() if not k.startswith(f"{split}_a")})


if __name__ == "__main__":
    main()
