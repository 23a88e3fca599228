"""MLflow entry point `train`: fine-tune one torchvision CNN and log everything to one run."""

import dataclasses

import click

from sceneml.cli import setup_logging, train_config, train_options, user_errors_as_one_line
from sceneml.config import TrainConfig
from sceneml.train import StopAfterEpoch, run_train

D = TrainConfig()


@click.command()
@train_options
@click.option("--optimizer", default=D.optimizer)
@click.option("--lr", type=float, default=D.lr)
@click.option("--resume", default="", help="run id of an interrupted run to continue")
@click.option("--stop-after-epoch", type=int, default=0, hidden=True)
@user_errors_as_one_line
def main(resume: str, stop_after_epoch: int, **params) -> None:
    setup_logging(params["quiet"])
    cfg = dataclasses.replace(train_config(**params), resume=resume, stop_after_epoch=stop_after_epoch)
    try:
        run_id = run_train(cfg)
    except StopAfterEpoch as stop:
        print(f"{stop}; continue with resume=<run_id>")
        return
    if run_id:  # "" on the non-main ranks of a torchrun launch
        print(f"run {run_id} finished")


if __name__ == "__main__":
    main()
