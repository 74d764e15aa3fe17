"""`lynx subject`: the people lynx holds data of, and erasure of that data on request.

``lynx subject erase`` calls ``lynx.erasure.erase_subject`` in this process (as ``lynx retention
purge`` does); the ``lynx-erase`` flow runs the same function on a work pool.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Any

import typer

from lynx.errors import InputError

if TYPE_CHECKING:
    from lynx.db.tracking import Tracker

app = typer.Typer(help="Subjects: list, show, erase on request.", no_args_is_help=True)


def _tracker() -> Tracker:
    from lynx.db.tracking import Tracker
    from lynx.settings import get_settings

    return Tracker.from_settings(get_settings())


def _day(value: Any) -> str:
    return value.strftime("%Y-%m-%d") if value is not None else "-"


def _subject_summary(tracker: Tracker, subject: Any) -> dict[str, Any]:
    from lynx.erasure import erasures_of, subject_status

    jobs = tracker.list_jobs(subject_id=subject.id)
    return {
        "id": subject.ref,
        "row": subject.id,
        "name": subject.name,
        "status": subject_status(subject, erasures_of(tracker, subject.id)),
        "photos": len(subject.photo_list),
        "consent_reference": subject.consent_reference,
        "consent_given_at": subject.consent_given_at.isoformat() if subject.consent_given_at else None,
        "retention_until": subject.retention_until.isoformat() if subject.retention_until else None,
        "jobs": len(jobs),
    }


@app.command("list")
def list_subjects(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON list on stdout.")] = False,
) -> None:
    """Every subject: id, photos, consent, retention, jobs and whether it was purged or erased."""
    with _tracker() as tracker:
        rows = [_subject_summary(tracker, subject) for subject in tracker.list_subjects()]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo("no subjects")
        return
    header = ("id", "name", "photos", "consent", "retention until", "jobs", "status")
    table = [
        (
            row["id"],
            row["name"],
            str(row["photos"]),
            row["consent_reference"] or "-",
            (row["retention_until"] or "-")[:10],
            str(row["jobs"]),
            row["status"],
        )
        for row in rows
    ]
    widths = [max(len(line[i]) for line in [header, *table]) for i in range(len(header) - 1)]
    for line in [header, *table]:
        typer.echo(
            "  ".join(cell.ljust(width) for cell, width in zip(line[:-1], widths, strict=True))
            + "  "
            + line[-1]
        )


@app.command()
def show(
    subject: Annotated[str, typer.Argument(help="Subject id (or subject-N for one registered without).")],
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on stdout.")] = False,
) -> None:
    """One subject: its photos (keys and sha256), consent, retention, jobs and erasures."""
    from lynx.erasure import erasures_of, find_subject

    with _tracker() as tracker:
        row = find_subject(tracker, subject)
        summary = _subject_summary(tracker, row)
        summary["created_at"] = row.created_at.isoformat()
        summary["photo_list"] = row.photo_list
        summary["job_list"] = [
            {"job": job.id, "campaign_id": job.campaign_id, "status": job.status.value, "prompt": job.prompt}
            for job in tracker.list_jobs(subject_id=row.id)
        ]
        summary["erasures"] = [
            {
                "erasure": erasure.id,
                "started_at": erasure.started_at.isoformat(),
                "finished_at": erasure.finished_at.isoformat() if erasure.finished_at else None,
                "with_deliverables": erasure.with_deliverables,
                "objects_removed": len(erasure.receipt.get("removed_keys", [])),
                "receipt_key": erasure.receipt_key,
            }
            for erasure in erasures_of(tracker, row.id)
        ]
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    typer.echo(f"subject {summary['id']} ({summary['name']}): {summary['status']}")
    typer.echo(
        f"  registered {summary['created_at'][:10]}; "
        f"retention until {(summary['retention_until'] or '-')[:10]}"
    )
    consent = summary["consent_reference"] or "none recorded"
    typer.echo(
        f"  consent: {consent}"
        + (f" (given {summary['consent_given_at'][:10]})" if summary["consent_given_at"] else "")
    )
    typer.echo(f"  photos: {len(summary['photo_list'])}")
    for photo in summary["photo_list"]:
        typer.echo(f"    {photo['key']}  sha256 {photo['sha256']}")
    typer.echo(f"  jobs: {len(summary['job_list'])}")
    for job in summary["job_list"]:
        prompt = job["prompt"] if len(job["prompt"]) <= 60 else job["prompt"][:57] + "..."
        typer.echo(f"    job {job['job']}  {job['status']}  {prompt}")
    for erasure in summary["erasures"]:
        state = f"finished {erasure['finished_at'][:16]}" if erasure["finished_at"] else "NOT FINISHED"
        typer.echo(
            f"  erasure {erasure['erasure']}: started {erasure['started_at'][:16]}, {state}, "
            f"{erasure['objects_removed']} objects removed; receipt {erasure['receipt_key'] or '-'}"
        )


@app.command()
def erase(
    subject: Annotated[str, typer.Argument(help="Subject id (or subject-N for one registered without).")],
    yes: Annotated[bool, typer.Option("--yes", help="Confirm: this cannot be undone.")] = False,
    with_deliverables: Annotated[
        bool, typer.Option("--with-deliverables", help="Also remove the videos and previews made of them.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the receipt as JSON.")] = False,
) -> None:
    """Erase a subject's photos and everything derived from them, in every campaign, and print the
    receipt. New jobs for the subject are refused from then on. Safe to run again (it finishes an
    erasure that was interrupted)."""
    from lynx.erasure import erase_subject
    from lynx.settings import get_settings

    if not yes:
        raise InputError(
            f"erasing subject {subject} deletes its photos and everything made from them for good; "
            "add --yes to confirm"
        )
    receipt = erase_subject(get_settings(), subject, with_deliverables=with_deliverables)
    if as_json:
        typer.echo(json.dumps(receipt.model_dump(mode="json", by_alias=True), indent=2))
        return
    if receipt.already_erased:
        typer.echo(
            f"subject {receipt.subject} was erased on {receipt.requested_at:%Y-%m-%d}; "
            "nothing was left to remove"
        )
    else:
        kinds = ", ".join(f"{count} {kind}" for kind, count in receipt.removed_by_kind.items()) or "none"
        typer.echo(
            f"erased subject {receipt.subject}: {receipt.objects_removed} objects removed "
            f"({receipt.removed_bytes} bytes: {kinds})"
        )
        if receipt.kept_deliverables:
            typer.echo(
                f"  kept {len(receipt.kept_deliverables)} delivered files "
                "(add --with-deliverables to remove them)"
            )
        if receipt.kept_shared:
            typer.echo(f"  kept {len(receipt.kept_shared)} objects also recorded for another subject")
        if receipt.jobs_stopped:
            typer.echo(f"  stopped jobs {', '.join(map(str, receipt.jobs_stopped))} (they were running)")
    typer.echo(f"receipt: {receipt.receipt_key}")
