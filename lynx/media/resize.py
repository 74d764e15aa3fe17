"""Output sizes and the quality resampler used outside ffmpeg.

ffmpeg resizes the videos itself (lanczos inside the encoding graph); this module covers what
Python resizes: Real-ESRGAN results brought to the exact target, posters and thumbnails.
"""

from __future__ import annotations

import cv2
import numpy as np


def even(value: float) -> int:
    """Nearest even integer >= 2 (yuv420p needs even widths and heights)."""
    return max(2, 2 * int(value / 2 + 0.5))


def output_size(width: int, height: int, target_height: int) -> tuple[int, int]:
    """(width, height) of the deliverable: the target height (0 = native) and the source aspect ratio."""
    if target_height == 0:
        return even(width), even(height)
    return even(width * target_height / height), target_height


def resize_frame(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an RGB frame to (width, height): Lanczos when enlarging, area averaging when shrinking.

    Lanczos does not low-pass when shrinking and would alias a 4x Real-ESRGAN result brought down
    to 1080p; area averaging is the right filter in that direction.
    """
    width, height = size
    if (frame.shape[1], frame.shape[0]) == (width, height):
        return frame
    shrinking = width < frame.shape[1] and height < frame.shape[0]
    return cv2.resize(
        frame, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LANCZOS4
    )
