"""`lynx generate` and `lynx demo`: run the `lynx` flow in this process, no server needed.

Without PREFECT_API_URL the flow runs on Prefect's embedded temporary server, whose database lives
under LYNX_HOME/prefect (not the user's ~/.prefect). With PREFECT_API_URL set, the run is recorded
on that server but still executes here. The deliverables are copied from the artifact store into
``--out`` and the master video's path is printed.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import typer

from lynx.errors import InputError, JobFailedError, JobNeedsReviewError, JobRunningElsewhereError
from lynx.settings import LynxSettings, get_settings

if TYPE_CHECKING:
    from lynx.jobs import GenerationSettings, JobOutcome

app = typer.Typer()


def use_embedded_prefect(settings: LynxSettings, *, verbose: bool) -> None:
    """Environment for an in-process flow run; set before Prefect is imported."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded while a job runs
    if not os.environ.get("PREFECT_API_URL"):
        os.environ.setdefault("PREFECT_HOME", str(settings.home / "prefect"))
        Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)  # Prefect won't
        # the first start creates the server's database: slow machines need more than the default 20 s
        os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    if not verbose:
        # Prefect logs every failed task with its traceback at ERROR; the CLI's own one-line reason
        # says what went wrong, and --verbose brings the run logs back.
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "CRITICAL")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def start_embedded_server() -> None:
    """Start Prefect's temporary server now, its output going to PREFECT_HOME/server.log.

    Prefect starts it lazily with this process's stderr; at exit it is terminated and uvicorn may log
    ``asyncio.exceptions.CancelledError: Cancelled via cancel scope`` AFTER our one-line error (seen
    under load). Started here with stderr pointed at a log file, the child keeps that file, so our
    line stays the last one on stderr. A no-op with PREFECT_API_URL set or once started.
    """
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():  # a real server (or a test harness): nothing to start
        return

    server = SubprocessASGIServer()  # the instance Prefect's clients use when no API URL is set
    if server.running:
        return
    home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()
    home.mkdir(parents=True, exist_ok=True)
    log = os.open(home / "server.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    saved = os.dup(2)
    sys.stderr.flush()
    os.dup2(log, 2)  # the child inherits fd 2 at its start; we take ours back right after
    try:
        server.start()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(log)


def run_job(
    images: Path | list[Path], prompt: str, generation: GenerationSettings, subject: str | None
) -> JobOutcome:
    """Run the `lynx` flow here; a job that ended without a video to hand over is a one-line error.

    A video held for review comes back like a completed one (its files are kept for the reviewer).
    """
    images = [images] if isinstance(images, Path) else images
    for image in images:
        if not image.is_file():
            raise InputError(f"image {image} does not exist or is not a file")
    if len(set(image.resolve() for image in images)) != len(images):
        raise InputError("the same --image is given twice")
    settings = get_settings()
    # without a GPU deployment the model loads here: missing weights fail now, not after the face stage
    if not settings.gpu_deployment:
        from lynx.model_loading import check_model_paths, settings_for_variant

        check_model_paths(settings_for_variant(settings, generation.variant))
    from flows.generate import lynx

    start_embedded_server()
    paths = [str(image.resolve()) for image in images]
    outcome = lynx(
        image=paths[0] if len(paths) == 1 else paths, prompt=prompt, settings=generation, subject_id=subject
    )
    if outcome.status in ("completed", "needs_review"):
        return outcome
    job = f"job {outcome.job_id}" if outcome.job_id is not None else "request"  # None: refused
    if outcome.status == "running":
        raise JobRunningElsewhereError(
            f"{job} is being run by another flow run that is still live; nothing was done here "
            "(run the command again once that run has ended)"
        )
    if outcome.status == "cancelled":
        raise JobFailedError(
            f"{job} was cancelled" + (f": {outcome.error_text}" if outcome.error_text else "")
        )
    raise JobFailedError(f"{job} failed at stage {outcome.error_stage}: {outcome.error_text}")


def fetch_deliverables(outcome: JobOutcome, out: Path) -> list[Path]:
    """Copy every published file of the job into ``out`` (verified against its sha256)."""
    from lynx.store import open_store

    store = open_store(get_settings())
    prefix = outcome.master_key.rsplit("/", 1)[0] + "/"
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for key in store.list(prefix):
        destination = out / key[len(prefix) :]
        store.get_file(key, destination)
        paths.append(destination)
    return paths


def report(outcome: JobOutcome, files: list[Path], seconds: float) -> None:
    """Print where the files are; a video held for review then exits with JobNeedsReviewError."""
    master = next(path for path in files if path.name == "master.mp4")
    held = outcome.status == "needs_review"
    typer.echo(f"job {outcome.job_id} {'held for review' if held else 'completed'} in {seconds:.1f} s")
    typer.echo(f"deliverable{' (held for review)' if held else ''}: {master}")
    for path in files:
        if path != master:
            typer.echo(f"  also: {path}")
    if outcome.similarity is not None:
        typer.echo(f"face resemblance to the photo (cosine, sampled frames): {outcome.similarity:.3f}")
    if outcome.candidates > 1:
        score = "no face found" if outcome.score is None else f"{outcome.score:.3f}"
        typer.echo(f"best of {outcome.candidates} candidates: seed {outcome.seed}, score {score}")
    if held:
        raise JobNeedsReviewError(
            f"job {outcome.job_id} needs review ({outcome.error_text}); its video is held for a reviewer, "
            f"files in {master.parent}"
        )


@app.command()
def generate(
    image: Annotated[
        list[Path],
        typer.Option(
            "--image",
            help="Photo of the person (one clearly visible face); repeat it for several photos of the "
            "same person.",
        ),
    ],
    prompt: Annotated[str, typer.Option("--prompt", help="What the video should show.")],
    out: Annotated[Path, typer.Option("--out", help="Folder the deliverables are copied into.")],
    seed: Annotated[int, typer.Option(help="Seed of the initial noise (same seed, same video).")] = 42,
    frames: Annotated[int | None, typer.Option(help="Frames, 4k+1 (default: 81 full, 121 lite).")] = None,
    height: Annotated[int, typer.Option(help="Height in pixels (multiple of 16).")] = 480,
    width: Annotated[int, typer.Option(help="Width in pixels (multiple of 16).")] = 832,
    steps: Annotated[int, typer.Option(help="Denoising steps.")] = 50,
    candidates: Annotated[
        int, typer.Option(help="Sample N videos (seeds seed..seed+N-1) and deliver the most alike.")
    ] = 1,
    variant: Annotated[
        Literal["full", "lite"] | None, typer.Option(help="Model variant (default: LYNX_MODEL_VARIANT).")
    ] = None,
    negative_prompt: Annotated[str | None, typer.Option(help="Negative prompt (default: Wan's).")] = None,
    subject: Annotated[
        str | None, typer.Option(help="Stable subject id: the face is analysed once across runs.")
    ] = None,
    demo_model: Annotated[
        bool, typer.Option("--demo-model", help="Use the tiny RANDOM demo model (built if missing).")
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Prefect's run logs.")] = False,
) -> None:
    """Generate one video of the person in --image doing what --prompt says, on this machine.

    Exit status: 0 completed; 8 the job failed or was cancelled; 9 the video was made but the
    quality gate held it for review (its files are still copied into --out); 10 another live run
    is working on the same job.
    """
    from pydantic import ValidationError

    from lynx.jobs import GenerationSettings

    settings = get_settings()
    use_embedded_prefect(settings, verbose=verbose)
    try:
        generation = GenerationSettings(
            seed=seed,
            frames=frames,
            height=height,
            width=width,
            steps=steps,
            variant=variant,
            negative_prompt=negative_prompt,
            candidates=candidates,
        )
    except ValidationError as err:
        first = err.errors()[0]
        option = f"--{first['loc'][0]}: " if first['loc'] else ""
        raise InputError(f"{option}{first['msg'].removeprefix('Value error, ')}") from None
    started = time.monotonic()
    if demo_model:
        from lynx.demo import DEMO_WARNING, demo_model_environment, ensure_demo_setup

        typer.echo(f"warning: {DEMO_WARNING}", err=True)
        ensure_demo_setup(settings)
        with demo_model_environment(settings, variant or "full"):
            outcome = run_job(image, prompt, generation, subject)
    else:
        outcome = run_job(image, prompt, generation, subject)
    report(outcome, fetch_deliverables(outcome, out), time.monotonic() - started)


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Folder the deliverables are copied into.")] = Path(
        "lynx-demo"
    ),
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Prefect's run logs.")] = False,
) -> None:
    """Run the whole pipeline once on a bundled photo with a tiny random model (first run: ~1 min)."""
    from lynx.assets import demo_face_path
    from lynx.demo import DEMO_PROMPT, DEMO_SETTINGS, DEMO_WARNING, demo_model_environment, ensure_demo_setup

    settings = get_settings()
    use_embedded_prefect(settings, verbose=verbose)
    typer.echo(f"warning: {DEMO_WARNING}")  # before the first minute is spent, and again at the end
    started = time.monotonic()
    typer.echo("lynx demo: checking the demo face pack and the tiny demo model (built on first use)...")
    model_dir = ensure_demo_setup(settings)
    typer.echo(f"demo model: {model_dir}")
    typer.echo(f"photo: {demo_face_path()} (public domain, NASA)  prompt: {DEMO_PROMPT!r}")
    typer.echo("running face -> reference -> text -> sample -> decode -> deliver ...")
    with demo_model_environment(settings, "full"):
        outcome = run_job(demo_face_path(), DEMO_PROMPT, DEMO_SETTINGS, None)
    report(outcome, fetch_deliverables(outcome, out), time.monotonic() - started)
    typer.echo(f"warning: {DEMO_WARNING}")
