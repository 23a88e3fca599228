"""MLflow entry point `select` (the script is not named select.py: it would shadow the stdlib module)."""

import click

from sceneml.cli import none_is_empty, setup_logging, user_errors_as_one_line
from sceneml.config import check_select_metric


@click.command()
@click.option("--experiment", default="", callback=none_is_empty, help="experiment name; default: the active one")
@click.option("--parent-run-id", default="", callback=none_is_empty, help="restrict to the children of one study")
@click.option("--select-metric", default="val_mean_class_acc")
@click.option("--model-name", default="sceneml")
@click.option("--alias", default="champion")
@user_errors_as_one_line
def main(experiment: str, parent_run_id: str, select_metric: str, model_name: str, alias: str) -> None:
    check_select_metric(select_metric)
    setup_logging()
    from sceneml.tasks.select import select

    select(experiment, parent_run_id, select_metric, model_name, alias)


if __name__ == "__main__":
    main()
