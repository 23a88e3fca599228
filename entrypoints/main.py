"""MLflow entry point `main`: the optimizer sweep, champion selection and test evaluation."""

import click

from sceneml.cli import setup_logging, train_config, train_options, user_errors_as_one_line
from sceneml.study import parse_list, run_study


@click.command()
@click.option("--optimizers", default="adamw,rmsprop,sgd")
@click.option("--lrs", default="0.001")
@click.option("--model-name", default="sceneml")
@click.option("--select-metric", default="val_mean_class_acc")
@train_options
@user_errors_as_one_line
def main(optimizers, lrs, model_name, select_metric, **params) -> None:
    setup_logging(params["quiet"])
    run_study(train_config(**params), parse_list(optimizers), parse_list(lrs, float), model_name, select_metric)


if __name__ == "__main__":
    main()
