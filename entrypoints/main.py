"""MLflow entry point `main`: the optimizer sweep, champion selection, test evaluation and analysis."""

import click

from sceneml.cli import (
    ANALYZE_OPTIONS,
    none_is_empty,
    setup_logging,
    train_config,
    train_options,
    user_errors_as_one_line,
)
from sceneml.config import AnalyzeConfig, StudyConfig

D = StudyConfig()


@click.command()
@click.option("--optimizers", default=D.optimizers)
@click.option("--lrs", default=D.lrs)
@click.option("--model-name", default=D.model_name)
@click.option("--experiment", default=D.experiment, callback=none_is_empty,
              help="experiment of the study (an explicit --experiment-name of mlflow run wins)")
@ANALYZE_OPTIONS["n_images"]
@ANALYZE_OPTIONS["compare"]
@train_options
@user_errors_as_one_line
def main(optimizers: str, lrs: str, model_name: str, experiment: str, n_images: int, compare: str,
         **params) -> None:
    cfg = StudyConfig(train_config(**params), optimizers, lrs, model_name,
                      AnalyzeConfig(n_images=n_images, compare=compare), experiment).validate()
    setup_logging(cfg.train.quiet)
    from sceneml.tasks.study import study

    study(cfg)


if __name__ == "__main__":
    main()
