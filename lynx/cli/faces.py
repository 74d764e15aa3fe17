"""`lynx faces ...`: look at what the face stage sees in a photo."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

app = typer.Typer(
    help="Face detection and identity embedding of reference photos.",
    no_args_is_help=True,
)


@app.command()
def embed(
    image: Annotated[Path, typer.Argument(help="Reference photo (JPEG, PNG, WebP, TIFF...).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print exactly one JSON object on stdout.")] = False,
    save_crops: Annotated[
        Path | None,
        typer.Option(
            "--save-crops",
            help="Folder to write the ArcFace crop (arcface_112.png, or the recogniser's input size) "
            "and the 256x256 reference crop into.",
            file_okay=False,
        ),
    ] = None,
) -> None:
    """Detect faces, choose the largest, and print its identity embedding."""
    from lynx.faces import analyze_reference_photo
    from lynx.settings import get_settings

    result = analyze_reference_photo(image, get_settings())
    # Written only after the photo passed every check: a rejected input leaves no files behind.
    if save_crops is not None:
        write_crops(
            save_crops,
            {
                f"arcface_{result.arcface_crop.shape[0]}.png": result.arcface_crop,
                "reference_256.png": result.reference_crop,
            },
        )
    if as_json:
        typer.echo(json.dumps(result.to_dict()))
        return
    count = len(result.faces)
    typer.echo(f"{image}: {count} face{'s' if count != 1 else ''}; the largest (*) is used")
    for index, face in enumerate(result.faces):
        marker = "*" if index == result.chosen else " "
        x1, y1, x2, y2 = (float(v) for v in face.box)
        box = f"({x1:.0f}, {y1:.0f}, {x2:.0f}, {y2:.0f})"
        typer.echo(f" {marker} #{index}  box {box}  score {face.score:.3f}")
    values = np.array2string(result.embedding, separator=", ", max_line_width=100,
                             threshold=result.embedding.size + 1,
                             formatter={"float_kind": lambda value: f"{value:+.4f}"})
    typer.echo(f"embedding ({result.embedding_model}, {result.embedding.shape[0]}-d):\n{values}")
    if save_crops is not None:
        typer.echo(f"crops written to {save_crops}")


@app.command()
def compare(
    images: Annotated[list[Path], typer.Argument(help="Two or more photos of (supposedly) one person.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print exactly one JSON object on stdout.")] = False,
) -> None:
    """What the face stage decides for a subject with these photos: how alike their faces are
    (cosine), whether they pass the same-person threshold, which photo gives the reference crop."""
    from lynx.errors import ConfigurationError, InputError
    from lynx.faces import analyze_reference_photo, cached_face_analyzer, cosine_similarity
    from lynx.faces.subject import (
        DifferentPersonError,
        PhotoFace,
        consistency,
        reference_score,
        same_person_threshold,
        subject_identity,
    )
    from lynx.settings import get_settings

    if len(images) < 2:
        raise InputError("compare needs two or more photos")
    settings = get_settings()
    analyzer = cached_face_analyzer(settings)
    faces = []
    for image in images:
        face = analyze_reference_photo(image, settings, analyzer=analyzer)
        faces.append(PhotoFace(face.embedding, face.score, face.box.tolist(), face.kps.tolist()))
    recognizer = analyzer.embedder.name
    try:
        threshold: float | None = same_person_threshold(recognizer, settings.face_same_person_thresholds)
    except ConfigurationError:
        threshold = None
    verdict = "same person"
    if threshold is None:
        verdict = "no same-person threshold known (LYNX_FACE_SAME_PERSON_THRESHOLDS)"
    else:
        try:
            subject_identity(
                faces,
                recognizer=recognizer,
                thresholds=settings.face_same_person_thresholds,
                names=[image.name for image in images],
            )
        except DifferentPersonError as err:
            verdict = str(err)
    matrix = [[round(cosine_similarity(a.embedding, b.embedding), 4) for b in faces] for a in faces]
    quality = [round(reference_score(face), 4) for face in faces]
    document = {
        "recognizer": recognizer,
        "threshold": threshold,
        "cosine": matrix,
        "consistency": [round(value, 4) for value in consistency([face.embedding for face in faces])],
        "reference_score": quality,
        "reference_photo": max(range(len(faces)), key=lambda i: (quality[i], -i)),
        "verdict": verdict,
    }
    if as_json:
        typer.echo(json.dumps(document))
        return
    shown = "-" if threshold is None else f"{threshold:.3f}"
    typer.echo(f"recogniser {recognizer}, same-person threshold {shown}")
    for index, image in enumerate(images):
        marker = "*" if index == document["reference_photo"] else " "
        cells = "  ".join(f"{value:+.3f}" for value in matrix[index])
        typer.echo(
            f" {marker} {index + 1}  {cells}  mean with others {document['consistency'][index]:+.3f}  "
            f"reference score {quality[index]:.3f}  {image}"
        )
    typer.echo(f"(*) gives the reference crop; verdict: {verdict}")


def write_crops(folder: Path, crops: dict[str, np.ndarray]) -> None:
    """Save ``crops`` (file name -> RGB array) into ``folder``: all of them or none.

    They are encoded into a temporary folder beside ``folder`` and only then moved in, so a full
    disk or a failing encoder never leaves one new crop next to an old or missing other.
    """
    from PIL import Image

    from lynx.errors import InputError

    target = folder.resolve()  # stage on the filesystem the files end up on
    created = not target.exists()
    staging: Path | None = None
    try:
        target.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        for name, crop in crops.items():
            Image.fromarray(crop).save(staging / name)
        for name in crops:
            os.replace(staging / name, target / name)
    except OSError as err:
        if created and target.is_dir() and not any(target.iterdir()):
            target.rmdir()
        reason = err.strerror or str(err)
        raise InputError(f"--save-crops {folder}: cannot write the crops there ({reason})") from err
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
