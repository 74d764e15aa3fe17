"""`lynx bench`: a subjects x prompts protocol, generated and evaluated through the real flows.

    lynx bench                                   # 2 sample subjects x 2 prompts, tiny demo model
    lynx bench --subjects 4 --prompts 3
    lynx bench --protocol paper --photos faces/ --model configured      # the paper's 40 x 20

The protocol is written as a campaign file under LYNX_HOME/bench/<name>/ and run by the
``lynx-bench`` flow (``lynx-campaign``, then ``lynx-eval``) in this process. Re-running the same
protocol keeps the completed jobs and only evaluates again.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Literal

import typer

from lynx.errors import InputError

app = typer.Typer()


@app.command()
def bench(
    subjects: Annotated[int | None, typer.Option(help="Subjects (default: 2; paper: 40).", min=1)] = None,
    prompts: Annotated[
        int | None, typer.Option(help="Prompts per subject (default: 2; paper: 20).", min=1)
    ] = None,
    protocol: Annotated[
        Literal["small", "paper"],
        typer.Option(help="'small' (CPU-sized) or 'paper' (40 x 20, needs --photos)."),
    ] = "small",
    photos: Annotated[
        Path | None,
        typer.Option(
            help="Folder of subject photos, one person each (default: the bundled sample, up to 8)."
        ),
    ] = None,
    prompts_file: Annotated[
        Path | None, typer.Option(help="Prompts, one per line (default: the built-in 20).")
    ] = None,
    model: Annotated[
        Literal["demo", "configured"],
        typer.Option(
            help="'demo': the tiny RANDOM model (noise, no faces); 'configured': LYNX_* model paths."
        ),
    ] = "demo",
    frames: Annotated[int | None, typer.Option(help="Frames per video, 4k+1.")] = None,
    height: Annotated[int | None, typer.Option(help="Height in pixels (multiple of 16).")] = None,
    width: Annotated[int | None, typer.Option(help="Width in pixels (multiple of 16).")] = None,
    steps: Annotated[int | None, typer.Option(help="Denoising steps.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of every job.")] = 42,
    name: Annotated[
        str | None, typer.Option(help="Campaign name (default: from the protocol's shape).")
    ] = None,
    report_dir: Annotated[
        Path | None, typer.Option(help="Folder for the evaluation report.", file_okay=False)
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the outcome as one JSON object.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Prefect's run logs.")] = False,
) -> None:
    """Run a subjects x prompts benchmark end to end and evaluate it (the paper's protocol shape)."""
    from lynx.cli.generate import use_embedded_prefect
    from lynx.settings import get_settings

    settings = get_settings()
    use_embedded_prefect(settings, verbose=verbose)
    subjects = subjects or (40 if protocol == "paper" else 2)
    prompts = prompts or (20 if protocol == "paper" else 2)
    if protocol == "paper" and photos is None:
        raise InputError("--protocol paper needs --photos: a folder with one photo per subject (40)")
    from lynx.evaluation.bench import BENCH_PROMPTS, default_campaign_name, folder_photos, read_prompts

    available = read_prompts(prompts_file) if prompts_file else BENCH_PROMPTS
    if len(available) < prompts:
        raise InputError(f"{prompts_file or 'the built-in list'} has {len(available)} prompts, not {prompts}")
    chosen_prompts = available[:prompts]
    chosen_photos = folder_photos(photos, subjects) if photos is not None else None
    generation = _generation(model, frames=frames, height=height, width=width, steps=steps, seed=seed)
    name = name or default_campaign_name(
        protocol=protocol,
        model=model,
        subjects=subjects,
        photos=chosen_photos,
        prompts=chosen_prompts,
        generation=generation,
        model_identity=_model_identity(settings) if model == "configured" else None,
    )
    if model == "demo":
        from lynx.demo import DEMO_WARNING, demo_model_environment, ensure_demo_setup

        typer.echo(f"warning: {DEMO_WARNING} Its identity numbers are meaningless.", err=True)
        ensure_demo_setup(settings)
    campaign_file = _write_protocol(
        settings,
        name=name,
        subjects=subjects,
        prompts=chosen_prompts,
        photos=chosen_photos,
        consent=f"lynx bench: photos from {photos.resolve()}" if photos is not None else None,
        generation=generation,
    )
    from flows.bench import lynx_bench

    with demo_model_environment(settings, "full") if model == "demo" else nullcontext():
        outcome = lynx_bench(str(campaign_file), name, report_dir=str(report_dir) if report_dir else None)
    typer.echo(json.dumps(outcome.model_dump(mode="json")) if as_json else "\n".join(outcome.summary_lines()))


def _generation(model: str, **overrides: int | None) -> dict[str, int]:
    """Generation settings of every job: small ones for the demo model, the model's defaults otherwise,
    with the command line's values on top."""
    from lynx.demo import DEMO_SETTINGS

    base = DEMO_SETTINGS.model_dump(exclude_none=True, include={"frames", "height", "width", "steps"})
    chosen = base if model == "demo" else {}
    return {**chosen, **{key: value for key, value in overrides.items() if value is not None}}


def _model_identity(settings) -> dict[str, str]:
    """Which configured model makes the videos (part of the default campaign name's hash)."""
    return {
        "base": str(settings.resolved_base_model_path),
        "adapter": str(settings.resolved_adapter_path),
        "variant": settings.model_variant,
    }


def _write_protocol(
    settings,
    *,
    name: str,
    subjects: int,
    prompts: list[str],
    photos: list[Path] | None,
    consent: str | None,
    generation: dict[str, int],
) -> Path:
    from lynx.evaluation.bench import SAMPLE_CONSENT, sample_photos, write_campaign_file
    from lynx.evaluation.publish import slug
    from lynx.faces import cached_face_analyzer

    folder = settings.home / "bench" / slug(name)
    if photos is None:
        photos = sample_photos(folder / "photos", subjects, cached_face_analyzer(settings))
        consent = SAMPLE_CONSENT
    return write_campaign_file(
        folder / "campaign.yaml",
        name=name,
        photos=photos,
        prompts=prompts,
        settings=generation,
        consent_reference=consent,
    )
