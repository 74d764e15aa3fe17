"""`lynx db`: create and migrate the tracking database."""

from __future__ import annotations

from typing import Annotated

import typer

app = typer.Typer(
    help="Tracking database: apply, revert and inspect schema migrations.", no_args_is_help=True
)


@app.command()
def upgrade(
    revision: Annotated[str, typer.Argument(help="Target revision (default: the newest).")] = "head",
) -> None:
    """Apply migrations up to REVISION (creates the tables on a new database)."""
    from lynx.db import migrate
    from lynx.settings import get_settings

    settings = get_settings()
    reached = migrate.upgrade(settings, revision)
    typer.echo(f"{settings.database_url_for_display}: at revision {reached}")


@app.command()
def downgrade(
    revision: Annotated[str, typer.Argument(help="Target revision; 'base' removes every lynx table.")],
) -> None:
    """Revert migrations down to REVISION."""
    from lynx.db import migrate
    from lynx.settings import get_settings

    settings = get_settings()
    reached = migrate.downgrade(settings, revision)
    typer.echo(f"{settings.database_url_for_display}: at revision {reached or 'base (no lynx tables)'}")


@app.command()
def current() -> None:
    """Show the database's revision and whether it is up to date."""
    from lynx.db import migrate
    from lynx.settings import get_settings

    settings = get_settings()
    at, head = migrate.current(settings), migrate.head_revision()
    state = "up to date" if at == head else f"behind: run `lynx db upgrade` to reach {head}"
    typer.echo(f"{settings.database_url_for_display}: at revision {at or 'base (no lynx tables)'} ({state})")


@app.command(hidden=True)
def revision(message: Annotated[str, typer.Argument(help="What the migration changes.")]) -> None:
    """(Developers) autogenerate a migration from the models against an up-to-date database."""
    from lynx.db import migrate
    from lynx.settings import get_settings

    path = migrate.make_revision(get_settings(), message)
    typer.echo(f"wrote {path}; review it before committing")
