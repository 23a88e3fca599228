"""MLflow entry point `main`: the optimizer sweep, champion selection, test evaluation and analysis."""

import click

from sceneml.analyze import AnalyzeConfig
from sceneml.cli import setup_logging, train_config, train_options, user_errors_as_one_line
from sceneml.study import parse_list, run_study


@click.command()
@click.option("--optimizers", default="adamw,rmsprop,sgd")
@click.option("--lrs", default="0.001")
@click.option("--model-name", default="sceneml")
@click.option("--select-metric", default="val_mean_class_acc")
@click.option("--n-images", type=float, default=AnalyzeConfig.n_images, help="analyze: images per data set")
@click.option("--compare", default="", help="analyze: comma list of name=path data sets for the spectra")
@train_options
@user_errors_as_one_line
def main(optimizers, lrs, model_name, select_metric, n_images, compare, **params) -> None:
    setup_logging(params["quiet"])
    run_study(train_config(**params), parse_list(optimizers), parse_list(lrs, float), model_name, select_metric,
              AnalyzeConfig(n_images=int(n_images), compare=compare))


if __name__ == "__main__":
    main()
