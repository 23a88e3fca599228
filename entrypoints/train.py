"""MLflow entry points `train` and `train_ddp`: fine-tune one torchvision CNN and log everything to one run.

``--nproc N`` (N > 1) starts the same command under ``torchrun --standalone`` with N processes.
"""

import os
import subprocess
import sys

import click

from sceneml.cli import none_is_empty, setup_logging, train_config, train_options, user_errors_as_one_line
from sceneml.config import TrainConfig

D = TrainConfig()


@click.command()
@train_options
@click.option("--optimizer", default=D.optimizer)
@click.option("--lr", type=float, default=D.lr)
@click.option("--resume", default="", callback=none_is_empty, help="run id of an interrupted run to continue")
@click.option("--nproc", type=int, default=1, help="processes (one per GPU) under torchrun; 1 = no torchrun")
@user_errors_as_one_line
def main(resume: str, nproc: int, **params) -> None:
    cfg = train_config(**params, resume=resume)
    if nproc > 1 and "LOCAL_RANK" not in os.environ:
        args, skip = [], False  # this command's own arguments, less --nproc N / --nproc=N
        for arg in sys.argv[1:]:
            if skip or arg.startswith("--nproc="):
                skip = False
                continue
            skip = arg == "--nproc"
            if not skip:
                args.append(arg)
        sys.exit(subprocess.call([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                  f"--nproc_per_node={nproc}", __file__, *args]))
    setup_logging(cfg.quiet)
    from sceneml.tasks.train import train  # torch and mlflow load only now: --help stays instant

    run_id = train(cfg)
    if run_id:  # "" on the other ranks of a torchrun launch
        print(f"run {run_id} finished")


if __name__ == "__main__":
    main()
