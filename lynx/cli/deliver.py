"""`lynx deliver`: operator tools for the deliverables stage.

lynx deliver build decoded.mkv --out ./out --job-id test-1   # deliverables from an intermediate
lynx deliver probe master.mp4                                 # what a file really contains
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="Build, inspect and check deliverables.", no_args_is_help=True)


@app.command()
def build(
    intermediate: Annotated[Path, typer.Argument(help="Lossless intermediate video (FFV1/MKV) from decode.")],
    out: Annotated[Path, typer.Option(help="Folder that receives the verified files.")] = Path(
        "deliverables"
    ),
    job_id: Annotated[str, typer.Option(help="Job id written into the metadata and manifest.")] = "adhoc",
    campaign: Annotated[str | None, typer.Option(help="Campaign name for the title.")] = None,
) -> None:
    """Build and verify the deliverables of one video with the current LYNX_DELIVER_* settings."""
    from lynx.media.deliver import build_deliverables
    from lynx.media.intermediate import iter_frames, lossless_info
    from lynx.media.provenance import Provenance
    from lynx.media.spec import DeliverySpec
    from lynx.settings import get_settings

    source = lossless_info(intermediate)
    spec = DeliverySpec.from_settings(get_settings(), source_fps=source.fps)
    out.mkdir(parents=True, exist_ok=True)
    result = build_deliverables(
        iter_frames(intermediate),
        spec=spec,
        workdir=out,
        provenance=Provenance(job_id=job_id, campaign=campaign),
    )
    for item in result.files:
        target = out / item.name
        shutil.move(item.path, target)
        typer.echo(f"{target}  {item.size} bytes  sha256 {item.sha256[:16]}...")
    result.cleanup()
    typer.echo(f"safety: {result.safety.status}")


@app.command()
def probe(path: Annotated[Path, typer.Argument(help="A video or image file.")]) -> None:
    """Print codec, size, frame count, durations, faststart and tags of a file as JSON."""
    from lynx.media.probe import probe_image, probe_video

    is_image = path.suffix.lower() in {".jpg", ".jpeg", ".png", ".webp"}
    info = probe_image(path) if is_image else probe_video(path)
    typer.echo(json.dumps(info.model_dump(mode="json"), indent=2))
