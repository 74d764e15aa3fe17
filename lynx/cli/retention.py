"""`lynx retention`: delete biometric data whose retention period has ended."""

from __future__ import annotations

from typing import Annotated

import typer

app = typer.Typer(help="Biometric data retention.", no_args_is_help=True)


@app.command()
def purge(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show what would be deleted; change nothing.")
    ] = False,
) -> None:
    """Delete photos, face crops and embeddings of subjects whose retention_until has passed."""
    from lynx.retention import purge_expired
    from lynx.settings import get_settings

    report = purge_expired(get_settings(), dry_run=dry_run)
    verb = "would delete" if dry_run else "deleted"
    for subject in report.subjects:
        typer.echo(
            f"subject {subject.subject_id} ({subject.name}), "
            f"retention ended {subject.retention_until:%Y-%m-%d}: "
            f"{verb} {len(subject.deleted_keys)} objects ({subject.bytes_deleted} bytes)"
            + (f", kept {len(subject.shared_keys)} shared with other subjects" if subject.shared_keys else "")
        )
    typer.echo(
        f"{len(report.subjects)} subjects past retention; {verb} {report.objects_deleted} objects "
        f"({report.bytes_deleted} bytes)"
    )
