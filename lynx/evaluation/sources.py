"""What to evaluate: the delivered videos of a campaign, or any videos listed in a manifest.

Both become ``EvalItem``s (a video, its reference photo, subject and prompt labels), so one code
path scores, records and reports them. Campaign items point into the artifact store and already
carry the sha256 of both files, which lets a re-run find stored metrics without downloading.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lynx.db.models import ArtifactKind, Job, JobStatus
from lynx.db.tracking import Tracker
from lynx.errors import InputError

#: Jobs whose video is final; others (pending, running, failed, cancelled) have nothing to score.
FINISHED = (JobStatus.COMPLETED, JobStatus.NEEDS_REVIEW)
MASTER_NAME = "master.mp4"


class EvalItem(BaseModel):
    """One video and the reference photo it should resemble.

    ``video`` and ``reference`` are local paths, or artifact-store keys when ``in_store``. A subject
    with several photos lists them all in ``references`` (``reference`` is the first): the video is
    compared with their fused embedding, and ``reference_sha256`` identifies the set.
    ``skip_reason`` says why an item cannot be scored (it still appears in the report).
    """

    model_config = ConfigDict(frozen=True)

    subject: str
    prompt: str
    video: str | None
    reference: str | None
    references: tuple[str, ...] = ()
    in_store: bool = False
    job_id: int | None = None
    video_sha256: str | None = None
    reference_sha256: str | None = None
    skip_reason: str | None = None

    @property
    def label(self) -> str:
        return f"job {self.job_id}" if self.job_id is not None else Path(self.video or "?").name


class ManifestEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    video: Path
    reference_photo: Path
    subject: str = Field(min_length=1)
    prompt: str = ""


class Manifest(BaseModel):
    """A YAML/JSON list of ``{video, reference_photo, subject, prompt}``, or a mapping with
    ``name`` and ``videos`` holding that list. Relative paths are relative to the manifest file."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    videos: list[ManifestEntry] = Field(min_length=1)


def load_manifest(path: str | Path) -> Manifest:
    """Read and validate a manifest; errors name the file, the entry and the field."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise InputError(f"cannot read manifest {path}: {err.strerror or err}") from None
    try:
        raw: Any = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as err:
        raise InputError(f"manifest {path} is not valid {path.suffix.lstrip('.') or 'YAML'}: {err}") from None
    if isinstance(raw, list):
        raw = {"name": path.stem, "videos": raw}
    if not isinstance(raw, dict):
        raise InputError(f"manifest {path} must be a list of videos or a mapping with 'videos'")
    raw.setdefault("name", path.stem)
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise InputError(f"manifest {path}: {where}: {first['msg']}") from None
    base = path.parent
    entries = [
        entry.model_copy(
            update={"video": base / entry.video, "reference_photo": base / entry.reference_photo}
        )
        for entry in manifest.videos
    ]
    return manifest.model_copy(update={"videos": entries})


def manifest_items(manifest: Manifest) -> list[EvalItem]:
    """Manifest entries as items; a missing file is a skip with its reason, not a failed run."""
    items = []
    for entry in manifest.videos:
        missing = next((p for p in (entry.video, entry.reference_photo) if not p.is_file()), None)
        items.append(
            EvalItem(
                subject=entry.subject,
                prompt=entry.prompt,
                video=str(entry.video),
                reference=str(entry.reference_photo),
                skip_reason=f"{missing} does not exist" if missing is not None else None,
            )
        )
    return items


def job_item(tracker: Tracker, job: Job) -> EvalItem:
    """A job's delivered master video and its subject's reference photo, both in the store."""
    subject = tracker.get_subject(job.subject_id)
    # Newest first: a job delivered again (a retry) re-publishes under the same key, new bytes.
    videos = tracker.list_artifacts(job_id=job.id, kind=ArtifactKind.VIDEO)[::-1]
    video = next(
        (a for a in videos if a.key.rsplit("/", 1)[-1] == MASTER_NAME), videos[0] if videos else None
    )
    skip = None
    if video is None:
        skip = "no delivered video recorded for the job"
    elif subject.purged_at is not None:
        skip = "the subject's reference photo was purged (retention ended)"
    elif subject.erased_at is not None:
        skip = f"the subject was erased on {subject.erased_at:%Y-%m-%d}"
    elif subject.reference_key is None:
        skip = "the subject has no reference photo"
    photos = subject.photo_list
    return EvalItem(
        subject=subject.external_ref or subject.name,
        prompt=job.prompt,
        video=video.key if video is not None else None,
        reference=subject.reference_key,
        references=tuple(photo["key"] for photo in photos) if len(photos) > 1 else (),
        in_store=True,
        job_id=job.id,
        video_sha256=video.sha256 if video is not None else None,
        reference_sha256=subject.reference_set_sha256,
        skip_reason=skip,
    )


class EvaluationSource(BaseModel):
    """A named set of items: a campaign's finished jobs or a manifest's videos."""

    name: str
    description: str
    items: list[EvalItem]
    campaign_id: int | None = None


def collect_source(
    tracker: Tracker,
    *,
    campaign: str | None = None,
    manifest: str | Path | None = None,
    name: str | None = None,
) -> EvaluationSource:
    """Exactly one of ``campaign`` (name) and ``manifest`` (file) says what to evaluate."""
    if (campaign is None) == (manifest is None):
        raise InputError("evaluate either a campaign or a manifest, not both or neither")
    if campaign is not None:
        row = tracker.get_campaign(campaign)
        jobs = tracker.list_jobs(campaign_id=row.id)
        items = [job_item(tracker, job) for job in jobs if job.status in FINISHED]
        waiting = len(jobs) - len(items)
        description = f"campaign {row.name}: {len(items)} finished jobs" + (
            f" ({waiting} not finished, not evaluated)" if waiting else ""
        )
        return EvaluationSource(
            name=name or row.name, description=description, items=items, campaign_id=row.id
        )
    loaded = load_manifest(manifest)
    return EvaluationSource(
        name=name or loaded.name,
        description=f"manifest {manifest}: {len(loaded.videos)} videos",
        items=manifest_items(loaded),
    )
