"""`lynx eval ...`: identity metrics and an HTML report for a campaign or a list of videos.

Both commands run the ``lynx-eval`` flow in this process (recorded on the Prefect server of
PREFECT_API_URL when set, else on Prefect's temporary local one under LYNX_HOME/prefect) and print
the summary and where the report is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="Evaluate identity preservation: face similarity of videos to their reference photos.",
    no_args_is_help=True,
)

_FORCE = typer.Option("--force", help="Measure again even where stored metrics exist.")
_REPORT_DIR = typer.Option(
    "--report-dir",
    help="Folder for report.html (default: a new folder under LYNX_EVAL_REPORTS_DIR).",
    file_okay=False,
)
_JSON = typer.Option("--json", help="Print the outcome as one JSON object.")
_VERBOSE = typer.Option("--verbose", "-v", help="Show Prefect's run logs (one line per video).")


@app.command()
def videos(
    manifest: Annotated[
        Path,
        typer.Option("--manifest", "-m", help="YAML/JSON list of {video, reference_photo, subject, prompt}."),
    ],
    name: Annotated[
        str | None, typer.Option("--name", help="Name of the evaluation (default: the file's).")
    ] = None,
    force: Annotated[bool, _FORCE] = False,
    report_dir: Annotated[Path | None, _REPORT_DIR] = None,
    as_json: Annotated[bool, _JSON] = False,
    verbose: Annotated[bool, _VERBOSE] = False,
) -> None:
    """Evaluate any videos listed with their reference photos."""
    from lynx.evaluation.sources import load_manifest

    load_manifest(manifest)  # a broken manifest is one line here, not a failed flow run
    _run(
        manifest=str(manifest.resolve()),
        name=name,
        force=force,
        report_dir=report_dir,
        as_json=as_json,
        verbose=verbose,
    )


@app.command()
def campaign(
    name: Annotated[str, typer.Argument(help="Campaign name.")],
    force: Annotated[bool, _FORCE] = False,
    report_dir: Annotated[Path | None, _REPORT_DIR] = None,
    as_json: Annotated[bool, _JSON] = False,
    verbose: Annotated[bool, _VERBOSE] = False,
) -> None:
    """Evaluate the delivered videos of a campaign's finished jobs."""
    from lynx.db.tracking import Tracker
    from lynx.settings import get_settings

    with Tracker.from_settings(get_settings()) as tracker:
        tracker.get_campaign(name)  # an unknown campaign is one line here, not a failed flow run
    _run(campaign=name, force=force, report_dir=report_dir, as_json=as_json, verbose=verbose)


def _run(*, report_dir: Path | None, as_json: bool, verbose: bool, **parameters: object) -> None:
    from lynx.cli.generate import use_embedded_prefect
    from lynx.settings import get_settings

    use_embedded_prefect(get_settings(), verbose=verbose)
    from flows.evaluate import lynx_eval

    outcome = lynx_eval(report_dir=str(report_dir) if report_dir else None, **parameters)
    typer.echo(json.dumps(outcome.model_dump(mode="json")) if as_json else "\n".join(outcome.summary_lines()))
