"""MLflow entry point `train`: fine-tune one torchvision CNN and log everything to one run."""

import click

from sceneml.cli import setup_logging, user_errors_as_one_line
from sceneml.config import TrainConfig, parse_bool
from sceneml.train import StopAfterEpoch, run_train

D = TrainConfig()


@click.command()
@click.option("--data", default=D.data, help="synthetic[:N], a folder, a Kaggle Intel folder or a .zip")
@click.option("--arch", default=D.arch)
@click.option("--weights", default=D.weights, help="auto | imagenet | none | path to a state dict")
@click.option("--optimizer", default=D.optimizer)
@click.option("--lr", type=float, default=D.lr)
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
@click.option("--resume", default="", help="run id of an interrupted run to continue")
@click.option("--stop-after-epoch", type=int, default=0, hidden=True)
@click.option("--quiet", is_flag=True, help="no progress bars")
@user_errors_as_one_line
def main(freeze_backbone: str, random_crop: str, quiet: bool, stop_after_epoch: int, **params) -> None:
    setup_logging(quiet)
    cfg = TrainConfig(**params, freeze_backbone=parse_bool(freeze_backbone), random_crop=parse_bool(random_crop),
                      quiet=quiet, stop_after_epoch=stop_after_epoch)
    try:
        run_id = run_train(cfg)
    except StopAfterEpoch as stop:
        print(f"{stop}; continue with resume=<run_id>")
        return
    print(f"run {run_id} finished")


if __name__ == "__main__":
    main()
