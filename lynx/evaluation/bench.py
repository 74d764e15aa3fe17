"""The benchmark protocol behind ``lynx bench``: subjects x prompts, as a campaign file.

The paper evaluates 40 subjects x 20 prompts (LYNX_SPEC section 8). ``lynx bench`` builds the same
shape, from a folder of subject photos and a prompts file (``--protocol paper``), or a small set
that runs on a CPU: up to 8 sample subjects cut from the face photos that ship with lynx and
insightface, and the first prompts of a built-in list. The campaign file then goes through the
real ``lynx-campaign`` and ``lynx-eval`` flows (``flows/bench.py``).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image
from pydantic import BaseModel

from lynx.errors import InputError
from lynx.evaluation.publish import EvaluationOutcome
from lynx.faces import FaceAnalyzer
from lynx.images import load_image
from lynx.jobs import JobOutcome
from lynx.media.provenance import sha256_file

PAPER_SUBJECTS, PAPER_PROMPTS = 40, 20
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
#: Consent recorded for the bundled sample photos (public-domain and library sample images).
SAMPLE_CONSENT = "lynx bench sample photo (public domain / package sample image)"

#: Twenty prompts in the spirit of the paper's set: everyday actions, scenes and camera moves.
BENCH_PROMPTS = [
    "a person smiling at the camera in soft window light",
    "a person walking along a beach at sunset, waves in the background",
    "a person reading a book in a quiet library",
    "a person riding a bicycle through a city street",
    "a person cooking pasta in a bright kitchen",
    "a person laughing with friends at an outdoor cafe",
    "a person hiking on a mountain trail, wind in their hair",
    "a person playing an acoustic guitar on a porch",
    "a person drinking coffee while it rains outside",
    "a person giving a talk on a stage under spotlights",
    "a person painting on a canvas in an art studio",
    "a person jogging in a park in the early morning",
    "a person turning to look over their shoulder, close-up",
    "a person typing on a laptop in a modern office",
    "a person dancing at a festival at night, colourful lights",
    "a person walking a dog through autumn leaves",
    "a person skiing down a snowy slope",
    "a person tasting wine in a vineyard",
    "a person in a rowing boat on a calm lake",
    "a person waving goodbye at a train station",
]


class BenchOutcome(BaseModel):
    """What ``lynx bench`` reports: the protocol's shape, the jobs, timings and the evaluation."""

    name: str
    subjects: int
    prompts: int
    jobs_by_status: dict[str, int]
    generation_seconds: float
    evaluation_seconds: float
    evaluation: EvaluationOutcome

    @classmethod
    def of(
        cls,
        name: str,
        jobs: Sequence[JobOutcome],
        evaluation: EvaluationOutcome,
        *,
        generation_seconds: float,
        evaluation_seconds: float,
    ) -> BenchOutcome:
        statuses = [job.status for job in jobs]
        return cls(
            name=name,
            subjects=len({job.subject for job in jobs}),
            prompts=len({job.prompt for job in jobs}),
            jobs_by_status={status: statuses.count(status) for status in dict.fromkeys(statuses)},
            generation_seconds=generation_seconds,
            evaluation_seconds=evaluation_seconds,
            evaluation=evaluation,
        )

    def summary_lines(self) -> list[str]:
        jobs = ", ".join(f"{count} {status}" for status, count in self.jobs_by_status.items() if count)
        return [
            f"{self.name}: {self.subjects} subjects x {self.prompts} prompts = "
            f"{self.subjects * self.prompts} jobs ({jobs})",
            f"generation {self.generation_seconds:.1f} s, evaluation {self.evaluation_seconds:.1f} s",
            *self.evaluation.summary_lines(),
        ]


def read_prompts(path: Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with '#' are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise InputError(f"cannot read prompts file {path}: {err.strerror or err}") from None
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def folder_photos(folder: Path, count: int) -> list[Path]:
    """The first ``count`` photos of ``folder`` in name order (one subject per photo)."""
    if not Path(folder).is_dir():
        raise InputError(f"photo folder {folder} does not exist")
    photos = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in PHOTO_SUFFIXES and p.is_file())
    if len(photos) < count:
        raise InputError(f"{folder} holds {len(photos)} photos; the protocol needs {count} subjects")
    return photos[:count]


def default_campaign_name(
    *,
    protocol: str,
    model: str,
    subjects: int,
    photos: Sequence[Path] | None,
    prompts: Sequence[str],
    generation: dict[str, Any],
    model_identity: dict[str, str] | None = None,
) -> str:
    """``bench-<protocol>-<N>x<M>-<model>-<hash>``: the hash covers everything that changes the
    videos (photo bytes, prompts, generation settings and seed, which model), so a protocol that
    differs in any of them is another campaign and its evaluation never mixes in the other's jobs.
    ``photos`` None means the first ``subjects`` of the bundled sample."""
    protocol_spec = {
        "protocol": protocol,
        "subjects": subjects,
        "model": model,
        "model_identity": model_identity or {},
        "photos": "bundled sample" if photos is None else [sha256_file(Path(photo)) for photo in photos],
        "prompts": list(prompts),
        "generation": generation,
    }
    digest = hashlib.sha256(json.dumps(protocol_spec, sort_keys=True, default=str).encode()).hexdigest()
    return f"bench-{protocol}-{subjects}x{len(prompts)}-{model}-{digest[:8]}"


def sample_photos(folder: Path, count: int, analyzer: FaceAnalyzer) -> list[Path]:
    """Up to 8 single-person photos from the images lynx and insightface ship: the demo portrait,
    insightface's Tom Hanks (padded) and each of the six people of insightface's ``t1.jpg``
    (cut around the faces ``analyzer`` finds). Written to ``folder``."""
    import insightface

    from lynx.assets import demo_face_path

    images = Path(insightface.__file__).parent / "data" / "images"
    hanks = np.asarray(load_image(images / "Tom_Hanks_54745.png", max_pixels=10**8))
    group = np.asarray(load_image(images / "t1.jpg", max_pixels=10**8))
    people = [
        np.asarray(load_image(demo_face_path(), max_pixels=10**8)),
        np.pad(hanks, ((100, 100), (100, 100), (0, 0))),
    ]
    faces = sorted(analyzer.find_faces(group), key=lambda face: float(face.box[0]))
    people += [_cut_around(group, face.box) for face in faces]
    if count > len(people):
        raise InputError(
            f"the bundled sample has {len(people)} subjects, not {count}; pass a folder of photos (--photos)"
        )
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, person in enumerate(people[:count], 1):
        path = folder / f"subject-{index:02d}.jpg"
        Image.fromarray(person).save(path, quality=92)
        paths.append(path)
    return paths


def _cut_around(image: np.ndarray, box: np.ndarray, margin: float = 0.6) -> np.ndarray:
    x1, y1, x2, y2 = (float(v) for v in box)
    dx, dy = (x2 - x1) * margin, (y2 - y1) * margin
    height, width = image.shape[:2]
    top, bottom = max(0, int(y1 - dy)), min(height, int(y2 + dy))
    left, right = max(0, int(x1 - dx)), min(width, int(x2 + dx))
    return np.ascontiguousarray(image[top:bottom, left:right])


def write_campaign_file(
    path: Path,
    *,
    name: str,
    photos: list[Path],
    prompts: list[str],
    settings: dict[str, Any],
    consent_reference: str,
) -> Path:
    """The protocol as a campaign file for ``lynx-campaign`` (one subject per photo)."""
    spec = {
        "name": name,
        "settings": settings,
        "subjects": [
            {
                "id": re.sub(r"[^A-Za-z0-9._-]+", "-", f"{name}-{photo.stem}"),
                "photo": str(photo.resolve()),
                "consent_reference": consent_reference,
            }
            for photo in photos
        ],
        "prompts": list(prompts),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path
