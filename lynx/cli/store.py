"""`lynx store`: put, fetch and share artifacts by key (operator tools)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from lynx.db.models import ArtifactKind
from lynx.store.base import MAX_PRESIGN_SECONDS

app = typer.Typer(help="Artifact store: upload, download, list and share objects.", no_args_is_help=True)


@app.command()
def put(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True, help="File to upload.")],
    key: Annotated[
        str | None, typer.Option(help="Explicit key; default is the content address sha256/aa/<hex>.")
    ] = None,
    content_type: Annotated[
        str | None, typer.Option(help="MIME type; guessed from the name if unset.")
    ] = None,
    kind: Annotated[
        ArtifactKind | None,
        typer.Option(
            help="Also record the object in the tracking database as this artifact kind "
            "(biometric kinds are purged with their subject).",
            case_sensitive=False,
        ),
    ] = None,
    subject: Annotated[int | None, typer.Option(help="With --kind: the subject id it belongs to.")] = None,
    job: Annotated[int | None, typer.Option(help="With --kind: the job id it belongs to.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the stored object as JSON.")] = False,
) -> None:
    """Upload FILE; prints its key and sha256."""
    from lynx.settings import get_settings
    from lynx.store import open_store

    settings = get_settings()
    tracker = None
    if kind is not None:
        from lynx.db.models import BIOMETRIC_KINDS
        from lynx.db.tracking import Tracker, biometric_without_subject_error

        if kind in BIOMETRIC_KINDS and subject is None and job is None:
            raise biometric_without_subject_error(kind, options=("--subject", "--job"))

        # Reach the database and check the owners before writing anything, so that a dead database
        # or a wrong id leaves no orphan object behind.
        tracker = Tracker.from_settings(settings)
        if subject is not None:
            tracker.get_subject(subject)
        if job is not None:
            tracker.get_job(job)
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
    key: Annotated[str, typer.Argument(help="Key of the object.")],
    dest: Annotated[
        Path, typer.Argument(help="File (or folder) to write; replaced only once the download is verified.")
    ],
) -> None:
    """Download KEY to DEST, verifying its sha256."""
    from lynx.settings import get_settings
    from lynx.store import open_store

    if dest.is_dir():
        dest = dest / key.rsplit("/", 1)[-1]
    stored = open_store(get_settings()).get_file(key, dest)
    typer.echo(f"sha256  {stored.sha256} (verified)\nsize    {stored.size}\nwrote   {dest}")


@app.command()
def url(
    key: Annotated[str, typer.Argument(help="Key of the object.")],
    expires: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=MAX_PRESIGN_SECONDS,
            help="Lifetime in seconds, at most 604800 (7 days); default LYNX_PRESIGN_EXPIRY_SECONDS.",
        ),
    ] = None,
) -> None:
    """Print a download URL for KEY (S3: presigned GET; local store: a file:// URL)."""
    from lynx.settings import get_settings
    from lynx.store import open_store

    typer.echo(open_store(get_settings()).presigned_url(key, expires))


@app.command("ls")
def list_keys(prefix: Annotated[str, typer.Argument(help="Only keys starting with this.")] = "") -> None:
    """List keys under PREFIX."""
    from lynx.settings import get_settings
    from lynx.store import open_store

    for found in open_store(get_settings()).list(prefix):
        typer.echo(found)
