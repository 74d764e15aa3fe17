"""Frames as the delivery stage takes them: uint8 RGB arrays ``[H, W, 3]``, one at a time.

The decode stage hands over a whole video as ``[F, H, W, 3]`` (float in [0, 1] or uint8) or any
iterable of frames. Converting lazily keeps one converted frame in memory instead of a second copy
of the video (81 frames at 1080p are 500 MB in uint8, 2 GB in float32).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from lynx.media.errors import DeliveryInputError


def _frame_to_uint8(frame: np.ndarray, index: int) -> np.ndarray:
    if frame.ndim != 3 or frame.shape[-1] != 3:
        raise DeliveryInputError(
            f"frame {index} has shape {tuple(frame.shape)}; expected [height, width, 3] RGB"
        )
    if frame.dtype == np.uint8:
        return frame
    if np.issubdtype(frame.dtype, np.floating):
        # Round rather than truncate: 0.5/255 steps would otherwise all darken by half a level.
        return (np.clip(frame, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    raise DeliveryInputError(f"frame {index} has dtype {frame.dtype}; expected uint8 or float in [0, 1]")


def to_uint8_frames(frames: np.ndarray | Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    """Yield uint8 RGB frames from a ``[F, H, W, 3]`` array or an iterable of ``[H, W, 3]`` frames.

    Floats are clipped to [0, 1] and rounded; every frame must have the size of the first one.
    Anything array-like with ``__array__`` (e.g. a CPU torch tensor) is accepted per frame.
    """
    if isinstance(frames, np.ndarray) and frames.ndim != 4:
        raise DeliveryInputError(f"video array has shape {frames.shape}; expected [frames, height, width, 3]")
    size: tuple[int, int] | None = None
    for index, frame in enumerate(frames):
        out = _frame_to_uint8(np.asarray(frame), index)
        if size is None:
            size = out.shape[:2]
        elif out.shape[:2] != size:
            raise DeliveryInputError(
                f"frame {index} is {out.shape[1]}x{out.shape[0]} but the video started at {size[1]}x{size[0]}"
            )
        yield out
