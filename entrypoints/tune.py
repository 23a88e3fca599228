"""MLflow entry point `tune`: an Optuna search over train parameters, shared by any number of workers."""

import click

from sceneml.cli import (
    ANALYZE_OPTIONS,
    none_is_empty,
    setup_logging,
    train_config,
    train_options,
    user_errors_as_one_line,
)
from sceneml.config import PRUNERS, AnalyzeConfig, TuneConfig

D = TuneConfig()


@click.command()
@click.option("--n-trials", type=int, default=D.n_trials, help="trials over all workers of the search")
@click.option("--space", default=D.space, callback=none_is_empty, help="YAML/JSON search space; default: see README")
@click.option("--pruner", default=D.pruner, help=" | ".join(PRUNERS))
@click.option("--storage", default=D.storage, callback=none_is_empty,
              help="Optuna storage: an SQLAlchemy URL or a journal file; default: optuna.journal beside the store")
@click.option("--study-name", default=D.study_name, callback=none_is_empty, help="default: tune-<arch>-<data>")
@click.option("--model-name", default=D.model_name)
@click.option("--experiment", default=D.experiment, callback=none_is_empty)
@click.option("--optimizer", default=D.train.optimizer, help="used when the space does not sample it")
@click.option("--lr", type=float, default=D.train.lr, help="used when the space does not sample it")
@ANALYZE_OPTIONS["n_images"]
@ANALYZE_OPTIONS["compare"]
@train_options
@user_errors_as_one_line
def main(n_trials: int, space: str, pruner: str, storage: str, study_name: str, model_name: str, experiment: str,
         n_images: int, compare: str, **params) -> None:
    cfg = TuneConfig(train_config(**params), n_trials, space, pruner, storage, study_name, model_name,
                     AnalyzeConfig(n_images=n_images, compare=compare), experiment).validate()
    setup_logging(cfg.train.quiet)
    from sceneml.tasks.tune import tune

    tune(cfg)


if __name__ == "__main__":
    main()
