"""`lynx campaign`: run a campaign file (on the server's deployment or in this process) and show the
state of a campaign's jobs.

With PREFECT_API_URL pointing at a server that has the ``lynx-campaign/campaign`` deployment, `run`
submits it (photos and campaign are stored first, see lynx/deployed.py) and returns at once, or
follows it with ``--watch``. Otherwise the campaign flow runs here, as `lynx generate` does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from lynx.cli.subject import _tracker

app = typer.Typer(help="Campaigns: run a campaign file, show its jobs.", no_args_is_help=True)

COLUMNS = [
    "id", "subject", "prompt", "state", "attempt", "score", "seed", "candidates", "deliverable", "error"
]
WIDTHS = {"prompt": 40, "error": 60}


@app.command("run")
def run(
    file: Annotated[Path, typer.Argument(help="Campaign file (YAML/JSON), e.g. examples/campaign.yaml.")],
    watch: Annotated[
        bool, typer.Option("--watch", help="Follow the submitted run to its end; non-zero unless Completed.")
    ] = False,
    deployment: Annotated[
        str, typer.Option("--deployment", help="The campaign deployment on the server.")
    ] = "lynx-campaign/campaign",
    interval: Annotated[float, typer.Option("--interval", help="Seconds between polls with --watch.")] = 2.0,
) -> None:
    """Run a campaign: on the Prefect server's campaign deployment when PREFECT_API_URL has one,
    else in this process."""
    from lynx.campaign import load_campaign
    from lynx.cli.generate import use_embedded_prefect
    from lynx.settings import get_settings

    settings = get_settings()
    spec = load_campaign(file)  # a bad file is one line before any server is asked
    use_embedded_prefect(settings, verbose=False)
    from lynx import deployed

    if deployed.api_url() and deployed.has_deployment(deployment):
        key = deployed.stage_campaign(file)
        flow_run = deployed.submit(deployment, {"campaign_file": key})
        typer.echo(f"submitted {deployment}: flow run {flow_run.name} ({flow_run.id})")
        typer.echo(f"campaign {spec.name}: {len(spec.requests())} jobs; campaign file stored as {key}")
        link = deployed.flow_run_link(flow_run.id)
        if link:
            typer.echo(f"UI: {link}")
        if watch:
            deployed.watch(flow_run.id, interval=interval, echo=typer.echo)
            _print_status(spec.name)
        else:
            typer.echo(f"follow it: lynx campaign status {spec.name}")
        return
    if deployed.api_url():
        note = f"no deployment {deployment} on {deployed.api_url()}: running the campaign in this process"
        typer.echo(note, err=True)
    _run_here(file, spec.name)


def _run_here(file: Path, name: str) -> None:
    from flows.campaign import lynx_campaign
    from lynx.cli.generate import start_embedded_server
    from lynx.errors import JobFailedError

    start_embedded_server()
    outcomes = lynx_campaign(str(file.resolve()))
    _print_status(name)
    bad = [o for o in outcomes if o.status not in ("completed", "needs_review")]
    if bad:
        first = bad[0]
        raise JobFailedError(
            f"{len(bad)} of {len(outcomes)} jobs of campaign {name} did not complete; "
            f"job {first.job_id}: {first.status}"
            + (f" at {first.error_stage}: {first.error_text}" if first.error_text else "")
        )


def _print_status(name: str) -> None:
    from lynx.joblist import campaign_rows, render_table

    with _tracker() as tracker:
        rows = campaign_rows(tracker, name)
    typer.echo(render_table(rows, COLUMNS, WIDTHS) if rows else f"campaign {name} has no jobs")


@app.command("status")
def status(
    name: Annotated[str, typer.Argument(help="The campaign's name (the `name:` of its file).")],
    as_json: Annotated[bool, typer.Option("--json", help="One JSON list on stdout.")] = False,
) -> None:
    """The campaign's jobs: id, subject, prompt, state, attempt, chosen score, seed, candidates,
    deliverable key and error."""
    from lynx.joblist import campaign_rows

    if as_json:
        with _tracker() as tracker:
            typer.echo(json.dumps(campaign_rows(tracker, name), indent=2))
        return
    _print_status(name)
