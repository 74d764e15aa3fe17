"""Turn decoded frames into the verified deliverables of one job.

``build_deliverables`` reads top to bottom as the steps of the stage:

1. check the assets (audio, logo, classifiers) before any frame is touched;
2. stream the frames through the safety gate (and Real-ESRGAN, unless the decode stage already
   did: ``upscaled_by``) into a lossless mezzanine;
3. enforce the safety verdict;
4. encode the H.264 master, then each rendition, verifying each file as it is made;
5. cut the previews from the master (poster, animated WebP, contact sheet) and verify them;
6. best-of-N jobs: encode the candidates that were not chosen (when the spec keeps them), each
   screened and verified like the master, as ``candidates/seed-<seed>.mp4``;
7. write the manifest with every output's sha256 (and every candidate's seed and score).

Everything lands in a fresh staging folder inside ``workdir``; if any step fails the folder is
removed and a typed ``DeliveryError`` (or a configuration error) is raised, so a failed stage never
leaves anything that could be mistaken for a deliverable.
"""

from __future__ import annotations

import itertools
import logging
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict

from lynx.media.audio import probe_audio
from lynx.media.codecs import H264, RENDITIONS, VideoFormat
from lynx.media.encode import (
    AudioTrack,
    EncodePlan,
    Watermark,
    converted_frame_count,
    encode_animated_preview,
    encode_video,
)
from lynx.media.errors import DeliveryInputError, InvalidDeliverySpecError
from lynx.media.ffmpeg import ffmpeg_exe, ffmpeg_version
from lynx.media.frames import to_uint8_frames
from lynx.media.intermediate import write_lossless
from lynx.media.manifest import build_manifest, write_manifest
from lynx.media.previews import (
    choose_poster,
    contact_sheet_indices,
    grab_frames,
    write_contact_sheet,
    write_poster,
)
from lynx.media.probe import MediaProbe
from lynx.media.provenance import Provenance, sha256_file
from lynx.media.resize import output_size
from lynx.media.safety import OnnxImageClassifierSafety, SafetyChecker, SafetyGate, SafetyVerdict
from lynx.media.spec import DeliverySpec, Upscaled
from lynx.media.verify import VideoExpectation, verify_animation, verify_image, verify_video

logger = logging.getLogger(__name__)

FileKind = Literal["master", "rendition", "poster", "preview", "contact_sheet", "candidate", "manifest"]
MANIFEST_NAME = "manifest.json"
CANDIDATES_FOLDER = "candidates"


class Candidate(BaseModel):
    """One video of a best-of-N job, as delivery sees it: its seed, its identity score, whether it is
    the master, and (to deliver it beside the master) its lossless intermediate."""

    model_config = ConfigDict(frozen=True)

    seed: int
    score: float | None = None
    chosen: bool = False
    source: Path | None = None


class CandidateSet(BaseModel):
    """A best-of-N job's candidates and how they were compared (``metric``, for the manifest)."""

    model_config = ConfigDict(frozen=True)

    metric: str
    items: list[Candidate]

    @property
    def chosen(self) -> Candidate:
        return next(item for item in self.items if item.chosen)


class DeliveredFile(BaseModel):
    """One verified output file in the staging folder."""

    model_config = ConfigDict(frozen=True)

    path: Path
    name: str
    kind: FileKind
    content_type: str
    sha256: str
    size: int
    probe: MediaProbe | None = None

    @classmethod
    def of(cls, path: Path, kind: FileKind, content_type: str, probe: MediaProbe | None) -> DeliveredFile:
        return cls(
            path=path,
            name=path.name,
            kind=kind,
            content_type=content_type,
            sha256=sha256_file(path),
            size=path.stat().st_size,
            probe=probe,
        )

    def manifest_entry(self, prefix: str | None = None) -> dict[str, Any]:
        entry = self.model_dump(mode="json", exclude={"path"})
        if prefix:  # where publishing puts it, so the manifest says where every file is
            entry["key"] = f"{prefix}/{self.name}"
        return entry


class DeliveryResult(BaseModel):
    """What ``build_deliverables`` made: verified files (manifest last), manifest and safety verdict."""

    staging_dir: Path
    files: list[DeliveredFile]
    manifest: dict[str, Any]
    safety: SafetyVerdict
    timings: dict[str, float]

    @property
    def master(self) -> DeliveredFile:
        return next(f for f in self.files if f.kind == "master")

    def file(self, name: str) -> DeliveredFile:
        return next(f for f in self.files if f.name == name)

    def cleanup(self) -> None:
        """Remove the staging folder (once the files are published)."""
        shutil.rmtree(self.staging_dir, ignore_errors=True)


class _Steps:
    """Times each step and logs it, so a slow delivery says where the time went."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start
        logger.info("deliverables: %s took %.2f s", name, self.timings[name])


def asset_entry(role: str, path: Path | None) -> dict[str, Any] | None:
    """The manifest's record of an input file (hashed in full), or None without one."""
    if path is None:
        return None
    return {"role": role, "file": path.name, "sha256": sha256_file(path), "size": path.stat().st_size}


def _check_watermark(path: Path) -> None:
    try:
        with Image.open(path) as image:
            image.verify()
    except (OSError, SyntaxError) as err:
        raise InvalidDeliverySpecError(
            f"watermark {path} is not a readable image: {err}", setting="LYNX_DELIVER_WATERMARK"
        ) from None


def _checker_for(spec: DeliverySpec) -> SafetyChecker | None:
    if spec.safety_model is None:
        return None
    return OnnxImageClassifierSafety(
        spec.safety_model,
        unsafe_index=spec.safety_unsafe_index,
        output=spec.safety_output,
        normalization=spec.safety_normalization,
    )


def learned_upscale(
    frames: Iterable[np.ndarray], source_size: tuple[int, int], spec: DeliverySpec
) -> tuple[Iterable[np.ndarray], Upscaled | None]:
    """The frames through Real-ESRGAN to the spec's size, when the spec asks for it and it enlarges.

    Lazy like the frames (one in memory at a time); what was done comes back for the manifest.
    Otherwise the frames come back untouched: ffmpeg's Lanczos resizes them when encoding.
    """
    source_w, source_h = source_size
    width, height = output_size(source_w, source_h, spec.height)
    weights = spec.realesrgan_weights
    if spec.upscaler != "realesrgan" or weights is None or height <= source_h:
        return frames, None
    from lynx.media.realesrgan import cached_upscaler, cached_weights_entry  # torch only when asked for

    upscaler = cached_upscaler(spec)
    done = Upscaled(
        label=f"realesrgan x{upscaler.scale} ({weights.name})",
        weights=cached_weights_entry(spec),
        source_width=source_w,
        source_height=source_h,
    )
    return upscaler.upscale_frames(frames, (width, height)), done


def build_deliverables(
    frames: np.ndarray | Iterable[np.ndarray],
    *,
    spec: DeliverySpec,
    workdir: Path,
    provenance: Provenance,
    face_scores: Sequence[float | None] | None = None,
    safety_checker: SafetyChecker | None = None,
    prefix: str | None = None,
    upscaled_by: Upscaled | None = None,
    candidates: CandidateSet | None = None,
) -> DeliveryResult:
    """Build, verify and describe every deliverable of one video.

    ``frames`` are uint8 (or float [0, 1]) RGB ``[H, W, 3]`` frames at ``spec.source_fps``, streamed:
    a generator is consumed once and never held in memory. ``face_scores`` (one per frame, None where
    no face was found) pick the poster. ``safety_checker`` replaces the classifier named in the spec.
    ``prefix``, the store prefix the files will be published under, adds each output's ``key`` to the
    manifest (``publish_deliverables`` then refuses any other prefix). ``upscaled_by`` says the
    frames were already enlarged by a learned upscaler (the pipeline's decode stage does it on the
    GPU), so the manifest names it and its weights; frames at the target size are not upscaled again.
    ``candidates``: a best-of-N job's candidates (``frames`` are the chosen one's); the manifest lists
    them all, and with ``spec.candidates == "keep"`` the others are delivered under ``candidates/``.
    """
    staging = Path(workdir) / f"delivery-{provenance.job_id}-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    prefix = prefix.strip("/") if prefix else None
    try:
        return _build(
            frames, spec, staging, provenance, face_scores, safety_checker, prefix, upscaled_by, candidates
        )
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _build(
    frames: np.ndarray | Iterable[np.ndarray],
    spec: DeliverySpec,
    staging: Path,
    provenance: Provenance,
    face_scores: Sequence[float | None] | None,
    safety_checker: SafetyChecker | None,
    prefix: str | None,
    upscaled_by: Upscaled | None,
    candidates: CandidateSet | None,
) -> DeliveryResult:
    steps = _Steps()
    work = staging / ".work"
    work.mkdir()
    exe = ffmpeg_exe(spec.ffmpeg_binary)
    tags = provenance.container_tags()

    # 1. Assets first: a bad audio file or logo must fail before minutes of encoding.
    with steps.step("check inputs"):
        audio = None
        if spec.audio is not None:
            probe_audio(spec.audio)
            audio = AudioTrack(
                path=spec.audio, fade_seconds=spec.audio_fade_seconds, bitrate=spec.audio_bitrate
            )
        watermark = None
        if spec.watermark is not None:
            _check_watermark(spec.watermark)
            watermark = Watermark(
                path=spec.watermark,
                position=spec.watermark_position,
                opacity=spec.watermark_opacity,
                width_fraction=spec.watermark_width,
            )
        checker = safety_checker or _checker_for(spec)
        gate = SafetyGate(checker, threshold=spec.safety_threshold, stride=spec.safety_stride)

    # 2. Frames -> safety gate -> (Real-ESRGAN) -> lossless mezzanine, one frame in memory at a time.
    with steps.step("stream frames"):
        stream = to_uint8_frames(frames)
        first = next(stream, None)
        if first is None:
            raise DeliveryInputError("no frames to deliver: the video is empty")
        source_h, source_w = first.shape[:2]
        width, height = output_size(source_w, source_h, spec.height)
        screened, upscaled = learned_upscale(
            gate.screen(itertools.chain([first], stream)), (source_w, source_h), spec
        )
        upscaling = "none" if (width, height) == (source_w, source_h) else "lanczos"
        if upscaled is not None:
            upscaling = upscaled.label
        if upscaled_by is not None:  # before delivery; at the target size what is done here is "none"
            upscaling = upscaled_by.label if upscaling == "none" else f"{upscaled_by.label}, then {upscaling}"
        mezzanine = write_lossless(
            screened, work / "mezzanine.mkv", spec.source_fps, ffmpeg_binary=spec.ffmpeg_binary
        )

    # 3. Safety before anything is encoded for delivery.
    verdict = gate.enforce()
    plan = EncodePlan(
        source=mezzanine, width=width, height=height, fps=spec.target_fps, fps_mode=spec.fps_mode
    )
    poster = choose_poster(
        face_scores,
        source_frames=mezzanine.frames,
        source_fps=spec.source_fps,
        fps=plan.fps,
        frames=plan.frames,
    )
    delivered: list[DeliveredFile] = []

    # 4. Videos: the master, then each rendition, each verified right after encoding.
    def video(fmt: VideoFormat, stem: str, kind: FileKind, crf: int) -> None:
        path = staging / fmt.filename(stem)
        with steps.step(f"encode {path.name}"):
            encode_video(
                plan,
                fmt,
                path,
                crf=crf,
                preset=spec.preset,
                exe=exe,
                audio=audio,
                watermark=watermark,
                tags=tags,
            )
        with steps.step("verify"):
            expected = VideoExpectation(
                codec=fmt.codec,
                width=width,
                height=height,
                frames=plan.frames,
                fps=plan.fps,
                audio_codec=fmt.audio_codec if audio else None,
                faststart=fmt.mp4,
                tags=tags,
            )
            delivered.append(DeliveredFile.of(path, kind, fmt.content_type, verify_video(path, expected)))

    video(H264, "master", "master", spec.crf)
    for name in spec.renditions:
        fmt = RENDITIONS[name]
        video(fmt, f"rendition_{name}", "rendition", {"h265": spec.h265_crf, "vp9": spec.vp9_crf}[name])
    master = delivered[0].path

    # 5. Previews, cut from the verified master.
    with steps.step("previews"):
        sheet_indices = contact_sheet_indices(plan.frames, spec.contact_sheet_frames)
        stills = grab_frames(master, {poster.frame_index, *sheet_indices})
        poster_path = staging / "poster.jpg"
        poster_size = write_poster(
            stills[poster.frame_index], poster_path, height=spec.poster_height, tags=tags
        )
        sheet_path = staging / "contact_sheet.png"
        sheet_size = write_contact_sheet(
            {i: stills[i] for i in sheet_indices},
            sheet_path,
            columns=spec.contact_sheet_columns,
            tile_height=spec.contact_sheet_tile_height,
            fps=plan.fps,
            tags=tags,
        )
        preview_path = staging / "preview.webp"
        # A preview is never larger than the master.
        preview_w, preview_h = output_size(width, height, min(spec.preview_height, height))
        preview_fps = encode_animated_preview(
            master,
            preview_path,
            frames=plan.frames,
            source_fps=plan.fps,
            height=preview_h,
            fps=spec.preview_fps,
            exe=exe,
        )
    with steps.step("verify"):
        preview_frames = converted_frame_count(plan.frames, plan.fps, float(preview_fps))
        delivered += [
            DeliveredFile.of(
                poster_path,
                "poster",
                "image/jpeg",
                verify_image(poster_path, codec="jpeg", width=poster_size[0], height=poster_size[1]),
            ),
            DeliveredFile.of(
                preview_path,
                "preview",
                "image/webp",
                verify_animation(
                    preview_path,
                    codec="webp",
                    width=preview_w,
                    height=preview_h,
                    frames=preview_frames,
                    fps=float(preview_fps),
                ),
            ),
            DeliveredFile.of(
                sheet_path,
                "contact_sheet",
                "image/png",
                verify_image(sheet_path, codec="png", width=sheet_size[0], height=sheet_size[1]),
            ),
        ]

    # 6. Best-of-N: the candidates that were not chosen, when the spec keeps them.
    candidate_outputs: dict[int, dict[str, Any]] = {}
    if candidates is not None and spec.candidates == "keep":
        for candidate in candidates.items:
            if candidate.chosen or candidate.source is None:
                continue
            with steps.step("candidates"):
                delivered_file, outcome = _candidate_video(
                    candidate, spec, staging, work, checker, plan, exe, audio, watermark, tags
                )
            candidate_outputs[candidate.seed] = outcome
            if delivered_file is not None:
                delivered.append(delivered_file)

    # 7. The manifest, last: it lists every verified output with its checksum.
    with steps.step("manifest"):
        upscalers = [u.weights for u in (upscaled_by, upscaled) if u is not None]
        assets = [
            asset_entry("audio", spec.audio),
            asset_entry("watermark", spec.watermark),
            *(w for i, w in enumerate(upscalers) if w not in upscalers[:i]),  # once if both used one file
            asset_entry("safety_model", spec.safety_model),
        ]
        manifest = build_manifest(
            provenance=provenance,
            delivery=spec.model_dump(mode="json"),
            assets=[a for a in assets if a is not None],
            source={  # what the model made: before any upscale, even one done before delivery
                "frames": mezzanine.frames,
                "width": upscaled_by.source_width if upscaled_by else source_w,
                "height": upscaled_by.source_height if upscaled_by else source_h,
                "fps": spec.source_fps,
            },
            video={
                "width": width,
                "height": height,
                "fps": plan.fps,
                "frames": plan.frames,
                "duration": plan.duration,
                "fps_mode": spec.fps_mode if plan.changes_rate else "native",
                "upscaling": upscaling,
            },
            poster=poster.model_dump(mode="json"),
            safety=verdict.model_dump(mode="json"),
            software={**provenance.software, "ffmpeg": ffmpeg_version(exe)},
            outputs=[f.manifest_entry(prefix) for f in delivered],
            candidates=_candidates_entry(candidates, spec, candidate_outputs),
        )
        manifest_path = write_manifest(manifest, staging / MANIFEST_NAME)
        delivered.append(DeliveredFile.of(manifest_path, "manifest", "application/json", None))
    shutil.rmtree(work)
    logger.info(
        "deliverables for job %s ready in %s (%d files, safety %s)",
        provenance.job_id,
        staging,
        len(delivered),
        verdict.status,
    )
    return DeliveryResult(
        staging_dir=staging, files=delivered, manifest=manifest, safety=verdict, timings=steps.timings
    )


def _candidate_video(
    candidate: Candidate,
    spec: DeliverySpec,
    staging: Path,
    work: Path,
    checker: SafetyChecker | None,
    master_plan: EncodePlan,
    exe: str,
    audio: AudioTrack | None,
    watermark: Watermark | None,
    tags: dict[str, str],
) -> tuple[DeliveredFile | None, dict[str, Any]]:
    """One candidate that was not chosen, screened, encoded like the master and verified.

    A candidate the safety gate blocks is not delivered (its manifest entry says why); the master's
    delivery goes on.
    """
    from lynx.media.intermediate import iter_frames

    gate = SafetyGate(checker, threshold=spec.safety_threshold, stride=spec.safety_stride)
    frames = to_uint8_frames(iter_frames(candidate.source))
    first = next(frames, None)
    if first is None:
        raise DeliveryInputError(f"candidate seed {candidate.seed}: its video is empty")
    screened, _ = learned_upscale(
        gate.screen(itertools.chain([first], frames)), (first.shape[1], first.shape[0]), spec
    )
    source = write_lossless(
        screened, work / f"candidate-{candidate.seed}.mkv", spec.source_fps, ffmpeg_binary=spec.ffmpeg_binary
    )
    verdict = gate.verdict()
    if verdict.status == "blocked":
        logger.warning("candidate seed %s not delivered: the content-safety gate blocked it", candidate.seed)
        return None, {"output": None, "safety": verdict.status}
    plan = master_plan.model_copy(update={"source": source})
    name = f"{CANDIDATES_FOLDER}/{H264.filename(f'seed-{candidate.seed}')}"
    path = staging / name
    path.parent.mkdir(exist_ok=True)
    own_tags = {**tags, "seed": str(candidate.seed)}
    encode_video(
        plan, H264, path, crf=spec.crf, preset=spec.preset, exe=exe, audio=audio, watermark=watermark,
        tags=own_tags,
    )
    expected = VideoExpectation(
        codec=H264.codec,
        width=plan.width,
        height=plan.height,
        frames=plan.frames,
        fps=plan.fps,
        audio_codec=H264.audio_codec if audio else None,
        faststart=H264.mp4,
        tags=own_tags,
    )
    probe = verify_video(path, expected)
    delivered = DeliveredFile.of(path, "candidate", H264.content_type, probe)
    return delivered.model_copy(update={"name": name}), {"output": name, "safety": verdict.status}


def _candidates_entry(
    candidates: CandidateSet | None, spec: DeliverySpec, outputs: dict[int, dict[str, Any]]
) -> dict[str, Any] | None:
    """The manifest's ``candidates``: every seed with its score, which one is the master, where each is."""
    if candidates is None:
        return None
    items = []
    for candidate in candidates.items:
        entry: dict[str, Any] = {"seed": candidate.seed, "score": candidate.score, "chosen": candidate.chosen}
        if candidate.chosen:
            entry["output"] = "master.mp4"
        else:
            entry.update(outputs.get(candidate.seed, {"output": None}))
        items.append(entry)
    return {
        "metric": candidates.metric,
        "chosen_seed": candidates.chosen.seed,
        "others": spec.candidates,
        "items": items,
    }
