"""MLflow entry point `main`: the optimizer sweep, champion selection and test evaluation."""

import click

from sceneml.cli import setup_logging, user_errors_as_one_line
from sceneml.config import TrainConfig, parse_bool
from sceneml.study import parse_list, run_study

D = TrainConfig()


@click.command()
@click.option("--optimizers", default="adamw,rmsprop,sgd")
@click.option("--lrs", default="0.001")
@click.option("--model-name", default="sceneml")
@click.option("--select-metric", default="val_mean_class_acc")
@click.option("--data", default=D.data)
@click.option("--arch", default=D.arch)
@click.option("--weights", default=D.weights)
@click.option("--momentum", type=float, default=D.momentum)
@click.option("--weight-decay", type=float, default=D.weight_decay)
@click.option("--scheduler", default=D.scheduler)
@click.option("--epochs", type=int, default=D.epochs)
@click.option("--batch-size", type=int, default=D.batch_size)
@click.option("--image-size", type=int, default=D.image_size)
@click.option("--seed", type=int, default=D.seed)
@click.option("--val-fraction", type=float, default=D.val_fraction)
@click.option("--test-fraction", type=float, default=D.test_fraction)
@click.option("--limit-per-class", type=int, default=D.limit_per_class)
@click.option("--freeze-backbone", default="false")
@click.option("--random-crop", default="false")
@click.option("--device", default=D.device)
@click.option("--num-workers", default=D.num_workers)
@click.option("--quiet", is_flag=True)
@user_errors_as_one_line
def main(optimizers, lrs, model_name, select_metric, freeze_backbone, random_crop, quiet, **params) -> None:
    setup_logging(quiet)
    base = TrainConfig(**params, freeze_backbone=parse_bool(freeze_backbone), random_crop=parse_bool(random_crop),
                       quiet=quiet)
    run_study(base, parse_list(optimizers), parse_list(lrs, float), model_name, select_metric)


if __name__ == "__main__":
    main()
