"""`lynx store`: put, fetch and share artifacts by key (operator tools)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import typer

app = typer.Typer(help="Artifact store: upload, download, list and share objects.", no_args_is_help=True)


@app.command()
def put(
    file: Path = typer.Argument(..., exists=True, dir_okay=False, readable=True, help="File to upload."),
    key: str = typer.Option(None, "--key", help="Explicit key; default is the content address sha256/aa/<hex>."),
    content_type: str = typer.Option(None, "--content-type", help="MIME type; guessed from the name if unset."),
    kind: str = typer.Option(
        None, "--kind", help="Also record the object in the tracking database as this artifact kind "
        "(e.g. reference_photo; biometric kinds are purged with their subject)."
    ),
    subject: int = typer.Option(None, "--subject", help="With --kind: the subject id it belongs to."),
    job: int = typer.Option(None, "--job", help="With --kind: the job id it belongs to."),
    as_json: bool = typer.Option(False, "--json", help="Print the stored object as JSON."),
) -> None:
    """Upload FILE; prints its key and sha256."""
    from lynx.settings import get_settings
    from lynx.store import open_store

    settings = get_settings()
    tracker = None
    if kind is not None:
        from lynx.db.tracking import Tracker

        # Reach the database before writing anything, so a dead database leaves no orphan object.
        tracker = Tracker.from_settings(settings)
    elif subject is not None or job is not None:
        raise typer.BadParameter("--subject and --job need --kind", param_hint="--kind")
    store = open_store(settings)
    store.check()
    stored = store.put_file(file, key=key, content_type=content_type)
    if tracker is not None:
        try:
            tracker.record_artifact(stored, kind=kind, subject_id=subject, job_id=job)
        finally:
            tracker.close()
    if as_json:
        typer.echo(json.dumps(asdict(stored)))
    else:
        typer.echo(f"key     {stored.key}\nsha256  {stored.sha256}\nsize    {stored.size}")


@app.command()
def get(
    key: str = typer.Argument(..., help="Key of the object."),
    dest: Path = typer.Argument(..., help="File to write (replaced only once the download is verified)."),
) -> None:
    """Download KEY to DEST, verifying its sha256."""
    from lynx.settings import get_settings
    from lynx.store import open_store

    stored = open_store(get_settings()).get_file(key, dest)
    typer.echo(f"sha256  {stored.sha256} (verified)\nsize    {stored.size}\nwrote   {dest}")


@app.command()
def url(
    key: str = typer.Argument(..., help="Key of the object."),
    expires: int = typer.Option(None, "--expires", min=1, help="Lifetime in seconds (default LYNX_PRESIGN_EXPIRY_SECONDS)."),
) -> None:
    """Print a download URL for KEY (S3: presigned GET; local store: a file:// URL)."""
    from lynx.settings import get_settings
    from lynx.store import open_store

    typer.echo(open_store(get_settings()).presigned_url(key, expires))


@app.command("ls")
def list_keys(prefix: str = typer.Argument("", help="Only keys starting with this.")) -> None:
    """List keys under PREFIX."""
    from lynx.settings import get_settings
    from lynx.store import open_store

    for found in open_store(get_settings()).list(prefix):
        typer.echo(found)
