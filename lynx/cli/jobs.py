"""`lynx jobs`: jobs from the tracking database, as a table or one in full (stages, deliverables)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from lynx.cli.subject import _tracker

app = typer.Typer(help="Jobs: list by campaign or state, show one with its stages.", no_args_is_help=True)

COLUMNS = [
    "id", "subject", "prompt", "state", "attempt", "score", "seed", "candidates", "deliverable", "error"
]
WIDTHS = {"prompt": 40, "error": 60}


@app.command("list")
def list_jobs(
    campaign: Annotated[str | None, typer.Option("--campaign", help="Only this campaign's jobs.")] = None,
    state: Annotated[
        str | None,
        typer.Option("--state", help="Only jobs in this state: pending, running, completed, failed, "
                     "cancelled, needs_review."),
    ] = None,
    limit: Annotated[int, typer.Option("--limit", help="At most this many, newest first.")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON list on stdout.")] = False,
) -> None:
    """Jobs, newest first: id, subject, prompt, state, attempt, score, seed, candidates, deliverable."""
    from lynx.joblist import job_rows, render_table

    with _tracker() as tracker:
        rows = job_rows(tracker, campaign=campaign, state=state, limit=limit)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
    elif not rows:
        typer.echo("no jobs")
    else:
        typer.echo(render_table(rows, COLUMNS, WIDTHS))


@app.command("show")
def show_job(
    job_id: Annotated[int, typer.Argument(help="The job's id (lynx jobs list).")],
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on stdout.")] = False,
) -> None:
    """One job: its fields, every stage run (status, duration, error) and its deliverables."""
    from lynx.joblist import job_detail, render_table

    with _tracker() as tracker:
        detail = job_detail(tracker, job_id)
    if as_json:
        typer.echo(json.dumps(detail, indent=2))
        return
    for field in ("id", "campaign", "subject", "state", "attempt", "needs_review", "prompt",
                  "negative_prompt", "seed", "candidates", "score", "created_at", "started_at",
                  "finished_at", "error"):
        value = detail.get(field)
        typer.echo(f"{field + ':':<16} {'-' if value is None else value}")
    typer.echo(f"{'params:':<16} {json.dumps(detail['params'], sort_keys=True)}")
    typer.echo("stages:")
    if detail["stages"]:
        table = render_table(detail["stages"], ["stage", "attempt", "status", "duration_s", "error"], WIDTHS)
        typer.echo("\n".join("  " + line for line in table.splitlines()))
    else:
        typer.echo("  none yet")
    typer.echo("deliverables:")
    for name, key in detail["deliverables"].items() or []:
        typer.echo(f"  {name}: {key}")
    if not detail["deliverables"]:
        typer.echo("  none")
