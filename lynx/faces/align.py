"""Five-point face alignment: the ArcFace 112x112 crop and Lynx's 256x256 reference crop.

Both follow insightface's ``norm_crop`` convention exactly (same template, same least-squares
similarity transform, ``cv2.warpAffine`` with bilinear sampling and a black border), so a crop
made here is pixel-identical to insightface's for the same keypoints. Templates for sizes that
are multiples of 112 are scaled; multiples of 128 are scaled from the 128-wide convention, which
centres the 112 template by shifting x by 8 px per 128.
"""

from __future__ import annotations

import cv2
import numpy as np

# The canonical ArcFace landmark positions in a 112x112 crop (eyes, nose, mouth corners).
ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float32,
)

# Lynx's reference crop shows more of the head: template moved down 10 px, then shrunk by 0.8
# about the 112 crop's centre (LYNX_SPEC 2.4).
EXTENDED_SHIFT_Y = 10.0
EXTENDED_SCALE = 0.8


def extended_template() -> np.ndarray:
    """The 112-convention template of the reference crop."""
    template = ARCFACE_TEMPLATE.copy()
    template[:, 1] += EXTENDED_SHIFT_Y
    return (template - 56.0) * EXTENDED_SCALE + 56.0


def template_for_size(template: np.ndarray, size: int) -> np.ndarray:
    """Scale a 112-convention template to a ``size`` x ``size`` crop, insightface's way."""
    if size % 112 == 0:
        ratio, shift_x = size / 112.0, 0.0
    elif size % 128 == 0:
        ratio = size / 128.0
        shift_x = 8.0 * ratio
    else:
        raise ValueError(f"crop size must be a multiple of 112 or 128, got {size}")
    scaled = template * ratio
    scaled[:, 0] += shift_x
    return scaled


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 rotation + uniform scale + translation that best maps ``src`` points onto ``dst``.

    Least squares in closed form (Umeyama, 1991, eqs. 38-42), without reflections. The sums run
    in the points' own dtype (float32 for detector keypoints), in the same order as
    scikit-image's estimator that insightface's ``norm_crop`` uses, so the matrix, and therefore
    every warped pixel, is identical to insightface's.
    """
    src = np.asarray(src)
    dst = np.asarray(dst)
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_centred, dst_centred = src - src_mean, dst - dst_mean
    covariance = dst_centred.T @ src_centred / src.shape[0]
    signs = np.ones(2, dtype=np.float64)
    if np.linalg.det(covariance) < 0:
        signs[1] = -1.0  # forbid a mirror image
    u, singular, vt = np.linalg.svd(covariance)
    rank = np.count_nonzero(singular > singular.max() * 2 * np.finfo(float).eps)
    if rank == 0:
        raise ValueError("keypoints are degenerate (all identical)")
    if rank == 1 and np.linalg.det(u) * np.linalg.det(vt) <= 0:
        rotation = u @ np.diag([1.0, -1.0]) @ vt  # collinear points: pick the proper rotation
    elif rank == 1:
        rotation = u @ vt
    else:
        rotation = u @ np.diag(signs) @ vt
    scale = 1.0 / src_centred.var(axis=0).sum() * (singular @ signs)
    matrix = np.empty((2, 3), dtype=np.float64)
    matrix[:, 2] = dst_mean - scale * (rotation @ src_mean)
    matrix[:, :2] = rotation * scale
    return matrix


def warp_to_template(image: np.ndarray, kps: np.ndarray, template: np.ndarray, size: int) -> np.ndarray:
    """Warp ``image`` so that ``kps`` land on ``template`` (already in output pixels)."""
    matrix = similarity_transform(np.asarray(kps, dtype=np.float32).reshape(5, 2), template)
    return cv2.warpAffine(image, matrix, (size, size), borderValue=0.0)


def arcface_crop(image: np.ndarray, kps: np.ndarray, size: int = 112) -> np.ndarray:
    """The recogniser input: ``size`` x ``size`` ArcFace-aligned crop, same channel order as ``image``."""
    return warp_to_template(image, kps, template_for_size(ARCFACE_TEMPLATE, size), size)


def reference_crop(image: np.ndarray, kps: np.ndarray, size: int = 256) -> np.ndarray:
    """Lynx's Ref-adapter input: the extended ("more head") crop, same channel order as ``image``."""
    return warp_to_template(image, kps, template_for_size(extended_template(), size), size)
