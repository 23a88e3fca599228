"""MLflow entry point `report`: rebuild the HTML and Markdown report of a study run."""

import click

from sceneml.cli import setup_logging, user_errors_as_one_line


@click.command()
@click.option("--study-run-id", required=True, help="the parent run that `main` created")
@user_errors_as_one_line
def main(study_run_id: str) -> None:
    setup_logging()
    from sceneml.tasks.report import report

    uris = report(study_run_id.strip())
    print(f"report: {uris['html']}\nmarkdown: {uris['markdown']}")


if __name__ == "__main__":
    main()
