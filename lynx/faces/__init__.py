"""The face stage: detection with five keypoints, alignment and identity embedding.

Plain functions and classes; the Prefect task in ``tasks/face.py`` and the ``lynx faces`` CLI
call ``analyze_reference_photo``. Evaluation uses ``lynx.faces.similarity``.
"""

from lynx.faces.align import arcface_crop, reference_crop
from lynx.faces.analyzer import (
    FaceAnalyzer,
    FaceTooSmallError,
    NoFaceError,
    ReferenceFace,
    analyze_reference_photo,
    cached_face_analyzer,
    check_embedding_compatible,
    load_face_analyzer,
)
from lynx.faces.embedders import ArcFaceIRSE50Embedder, OnnxArcFaceEmbedder
from lynx.faces.pack import DEMO_PACK_NAME, FacePack, ensure_demo_pack
from lynx.faces.types import DetectedFace, FaceDetector, FaceEmbedder, cosine_similarity
from lynx.faces.yunet import YuNetDetector

__all__ = [
    "DEMO_PACK_NAME",
    "ArcFaceIRSE50Embedder",
    "DetectedFace",
    "FaceAnalyzer",
    "FaceDetector",
    "FaceEmbedder",
    "FacePack",
    "FaceTooSmallError",
    "NoFaceError",
    "OnnxArcFaceEmbedder",
    "ReferenceFace",
    "YuNetDetector",
    "analyze_reference_photo",
    "arcface_crop",
    "cached_face_analyzer",
    "check_embedding_compatible",
    "cosine_similarity",
    "ensure_demo_pack",
    "load_face_analyzer",
    "reference_crop",
]
