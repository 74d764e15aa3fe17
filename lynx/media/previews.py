"""Stills made from the verified master: poster JPEG and contact-sheet PNG.

The poster shows the frame whose face is most similar to the reference when the face stage scored
frames, else the middle frame. Both are cut from the encoded master so they show exactly what is
delivered (rate conversion and logo included). Both carry the provenance tags as text.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

import av
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo
from pydantic import BaseModel, ConfigDict

from lynx.media.encode import converted_frame_index
from lynx.media.errors import DeliveryInputError, VerificationError
from lynx.media.resize import output_size, resize_frame

_GAP = 4
_BACKGROUND = (24, 24, 24)


class PosterChoice(BaseModel):
    model_config = ConfigDict(frozen=True)

    source_index: int
    frame_index: int
    reason: Literal["best_face_score", "middle_frame"]
    score: float | None = None


def choose_poster(
    face_scores: Sequence[float | None] | None,
    *,
    source_frames: int,
    source_fps: float,
    fps: float,
    frames: int,
) -> PosterChoice:
    """Pick the poster frame; ``face_scores`` (one per source frame, None = no face) must match the video."""
    if face_scores is not None and len(face_scores) != source_frames:
        raise DeliveryInputError(f"got {len(face_scores)} face scores for {source_frames} frames")
    scored = [(s, i) for i, s in enumerate(face_scores or ()) if s is not None and not math.isnan(s)]
    if scored:
        score, source_index = max(scored)
        reason: Literal["best_face_score", "middle_frame"] = "best_face_score"
    else:
        score, source_index, reason = None, source_frames // 2, "middle_frame"
    frame_index = min(converted_frame_index(source_index, source_fps, fps), frames - 1)
    return PosterChoice(source_index=source_index, frame_index=frame_index, reason=reason, score=score)


def contact_sheet_indices(frames: int, count: int) -> list[int]:
    """``count`` frame indices spread evenly from first to last frame (fewer if the video is short)."""
    return sorted({round(i) for i in np.linspace(0, frames - 1, min(count, frames))})


def grab_frames(video: Path, indices: Iterable[int]) -> dict[int, np.ndarray]:
    """Decode a video once and keep only the frames at ``indices`` (RGB uint8)."""
    wanted, found = set(indices), {}
    with av.open(str(video)) as container:
        for index, frame in enumerate(container.decode(video=0)):
            if index in wanted:
                found[index] = frame.to_ndarray(format="rgb24")
                if len(found) == len(wanted):
                    break
    missing = wanted - found.keys()
    if missing:
        raise VerificationError(f"{video.name} has no frame {min(missing)}")
    return found


def _png_info(tags: dict[str, str]) -> PngInfo:
    info = PngInfo()
    for key, value in tags.items():
        info.add_text(key, value)
    return info


def jpeg_comment(tags: dict[str, str]) -> str:
    """JPEG has one comment field: the AI label first, then the other tags."""
    rest = ", ".join(f"{k}={v}" for k, v in tags.items() if k != "comment")
    return f"{tags.get('comment', '')} ({rest})" if rest else tags.get("comment", "")


def write_poster(frame: np.ndarray, path: Path, *, height: int, tags: dict[str, str]) -> tuple[int, int]:
    """Save the poster JPEG at ``height`` (0 = the frame's own); returns its (width, height)."""
    size = output_size(frame.shape[1], frame.shape[0], height)
    Image.fromarray(resize_frame(frame, size)).save(path, "JPEG", quality=92, comment=jpeg_comment(tags))
    return size


def write_contact_sheet(
    frames: dict[int, np.ndarray],
    path: Path,
    *,
    columns: int,
    tile_height: int,
    fps: float,
    tags: dict[str, str],
) -> tuple[int, int]:
    """A grid of thumbnails, each labelled with its frame number and time; returns the sheet size."""
    first = next(iter(frames.values()))
    tile_w, tile_h = output_size(first.shape[1], first.shape[0], tile_height)
    label_h = max(12, tile_h // 8)
    columns = min(columns, len(frames))
    rows = math.ceil(len(frames) / columns)
    size = (columns * tile_w + (columns + 1) * _GAP, rows * (tile_h + label_h) + (rows + 1) * _GAP)
    sheet = Image.new("RGB", size, _BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=label_h - 3)
    for slot, index in enumerate(sorted(frames)):
        x = _GAP + (slot % columns) * (tile_w + _GAP)
        y = _GAP + (slot // columns) * (tile_h + label_h + _GAP)
        sheet.paste(Image.fromarray(resize_frame(frames[index], (tile_w, tile_h))), (x, y))
        draw.text((x + 2, y + tile_h + 1), f"#{index}  {index / fps:.2f}s", fill=(220, 220, 220), font=font)
    sheet.save(path, "PNG", pnginfo=_png_info(tags))
    return size
