"""MLflow entry point `analyze`: galleries, activation statistics and eigen-spectra of one model."""

import click

from sceneml.cli import ANALYZE_OPTIONS, options, setup_logging, user_errors_as_one_line
from sceneml.config import AnalyzeConfig


@click.command()
@options(list(ANALYZE_OPTIONS.values()))
@user_errors_as_one_line
def main(**params) -> None:
    cfg = AnalyzeConfig(**params).validate()
    setup_logging()
    from sceneml.tasks.analyze import analyze

    metrics = analyze(cfg)
    for key, value in sorted(metrics.items()):
        print(f"{key} = {value:.4f}")


if __name__ == "__main__":
    main()
