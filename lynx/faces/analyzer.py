"""Detector + recogniser composed, and the reference-photo policy of the Lynx front-end.

``FaceAnalyzer`` plays the part of insightface's ``FaceAnalysis`` (it only composes models);
``load_face_analyzer`` builds one from the configured face pack; ``analyze_reference_photo``
applies LYNX_SPEC section 2: the largest face wins, it must be big enough to crop, and it yields
the identity embedding plus the ArcFace and reference crops.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lynx.caching import cached_per_configuration
from lynx.errors import ConfigurationError, InputError, ModelWeightsError
from lynx.faces.align import arcface_crop, reference_crop
from lynx.faces.detectors import InsightFaceDetector
from lynx.faces.embedders import ArcFaceIRSE50Embedder, OnnxArcFaceEmbedder
from lynx.faces.pack import FacePack, PackModel
from lynx.faces.runtime import onnx_providers, torch_device, zoo_model
from lynx.faces.types import DetectedFace, FaceDetector, FaceEmbedder
from lynx.faces.yunet import YuNetDetector
from lynx.images import load_image
from lynx.settings import LynxSettings

REFERENCE_CROP_SIZE = 256
# bytes read from each end of a model file for its fingerprint
_FINGERPRINT_SAMPLE = 1 << 16


class NoFaceError(InputError):
    """No face was found in the image."""


class FaceTooSmallError(InputError):
    """The chosen face is smaller than ``LYNX_FACE_MIN_SIZE``."""


class FaceAnalyzer:
    """Finds faces in RGB images and embeds them. Inputs are RGB (lynx's image convention);
    the models see BGR, as insightface's do."""

    def __init__(self, detector: FaceDetector, embedder: FaceEmbedder) -> None:
        self.detector = detector
        self.embedder = embedder

    def find_faces(self, image_rgb: np.ndarray) -> list[DetectedFace]:
        return self.detector.detect(_bgr(image_rgb))

    def embed(self, image_rgb: np.ndarray, face: DetectedFace) -> np.ndarray:
        """The identity embedding of one detected face of ``image_rgb``."""
        return self.embedder.embed(arcface_crop(_bgr(image_rgb), face.kps, self.embedder.input_size))

    @staticmethod
    def largest(faces: list[DetectedFace]) -> int:
        """Index of the face with the largest box (the reference's choice); ties: the first."""
        if not faces:
            raise ValueError("no faces to choose from")
        return int(np.argmax([face.area for face in faces]))


@dataclass(frozen=True)
class ReferenceFace:
    """The face front-end's result for one reference photo. Arrays are RGB ``uint8``."""

    faces: list[DetectedFace]
    chosen: int
    embedding: np.ndarray  # (dim,) float32, L2-normalised
    embedding_model: str
    arcface_crop: np.ndarray  # (S, S, 3) RGB, S = the recogniser's input size: what it saw (as BGR)
    reference_crop: np.ndarray  # (256, 256, 3) RGB: the Ref-adapter input
    image_size: tuple[int, int]  # (height, width) after EXIF rotation

    @property
    def face(self) -> DetectedFace:
        return self.faces[self.chosen]

    @property
    def box(self) -> np.ndarray:
        return self.face.box

    @property
    def score(self) -> float:
        return self.face.score

    @property
    def kps(self) -> np.ndarray:
        return self.face.kps

    def to_dict(self) -> dict[str, Any]:
        """The JSON document of ``lynx faces embed --json``."""
        return {
            "faces": [face.to_dict() for face in self.faces],
            "chosen": self.chosen,
            "embedding": [float(value) for value in self.embedding],
            "embedding_model": self.embedding_model,
        }


def analyze_reference_photo(
    path: str | Path | bytes, settings: LynxSettings, *, analyzer: FaceAnalyzer | None = None
) -> ReferenceFace:
    """Detect, choose, check, align and embed the face of a reference photo.

    Raises ``ImageError`` subclasses for unusable files, ``NoFaceError`` and ``FaceTooSmallError``
    for unusable photos, ``ModelWeightsError`` when the face models are missing.
    """
    image = load_image(path, max_pixels=settings.max_image_pixels)
    name = "the image" if isinstance(path, (bytes, bytearray)) else str(path)
    analyzer = analyzer or cached_face_analyzer(settings)
    faces = analyzer.find_faces(image)
    if not faces:
        raise NoFaceError(f"no face found in {name}; use a photo with one clearly visible face")
    chosen = FaceAnalyzer.largest(faces)
    face = faces[chosen]
    if face.short_side < settings.face_min_size:
        raise FaceTooSmallError(
            f"the largest face in {name} is {face.short_side:.0f} px on its short side, below the "
            f"minimum of {settings.face_min_size} px; use a closer or larger photo",
            setting="LYNX_FACE_MIN_SIZE",
        )
    crop_rgb = arcface_crop(image, face.kps, analyzer.embedder.input_size)
    embedding = analyzer.embedder.embed(np.ascontiguousarray(crop_rgb[..., ::-1]))
    return ReferenceFace(
        faces=faces,
        chosen=chosen,
        embedding=embedding.astype(np.float32),
        embedding_model=analyzer.embedder.name,
        arcface_crop=crop_rgb,
        reference_crop=reference_crop(image, face.kps, REFERENCE_CROP_SIZE),
        image_size=(int(image.shape[0]), int(image.shape[1])),
    )


def load_face_analyzer(settings: LynxSettings, *, recognizer: FaceEmbedder | None = None) -> FaceAnalyzer:
    """Build the configured detector and recogniser (``recognizer`` overrides the latter).

    Raises ModelWeightsError naming the setting and the missing or damaged file.
    """
    providers = onnx_providers(settings.face_device)
    pack = FacePack.read(settings.resolved_face_pack_dir)
    pack.verify()
    if pack.detector is not None:
        detector = _manifest_detector(pack, pack.detector, settings, providers)
        routed_recognizer = None
    else:
        wants_pack_recognizer = settings.embedding_backend == "onnx" and not settings.face_recognizer
        detector, routed_recognizer = _route_insightface_pack(
            pack, settings, providers, find_recognizer=wants_pack_recognizer and recognizer is None
        )
    embedder = recognizer or load_embedder(settings, pack, providers, routed=routed_recognizer)
    return FaceAnalyzer(detector, embedder)


def face_models_fingerprint(settings: LynxSettings) -> str:
    """A short identifier of the model files the face analysis would use (not an integrity check).

    Cached face results are keyed by it, so replacing a recogniser or detector file under the same
    name (a new IR-SE50 download, another pack unpacked into the folder) never reuses embeddings
    of the old models. Size plus the first and last 64 KiB: cheap on every job, different for any
    two trainings.
    """
    files: list[Path] = []
    pack_dir = settings.resolved_face_pack_dir
    if pack_dir.is_dir():
        files += sorted(p for p in pack_dir.rglob("*") if p.suffix in (".onnx", ".json") and p.is_file())
    if settings.embedding_backend == "arcface_ir_se50":
        files.append(settings.resolved_arcface_weights_path)
    if settings.face_recognizer:
        recognizer = Path(settings.face_recognizer).expanduser()
        files.append(recognizer if recognizer.is_absolute() else pack_dir / recognizer)
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path).encode())
        if not path.is_file():  # loading will fail with the setting named; the key just has to differ
            digest.update(b"absent")
            continue
        size = path.stat().st_size
        digest.update(str(size).encode())
        with path.open("rb") as handle:
            digest.update(handle.read(_FINGERPRINT_SAMPLE))
            handle.seek(max(0, size - _FINGERPRINT_SAMPLE))
            digest.update(handle.read(_FINGERPRINT_SAMPLE))
    return digest.hexdigest()[:16]


def load_embedder(
    settings: LynxSettings,
    pack: FacePack,
    providers: list[str],
    *,
    routed: OnnxArcFaceEmbedder | None = None,
) -> FaceEmbedder:
    """The recogniser chosen by ``LYNX_EMBEDDING_BACKEND`` (and ``LYNX_FACE_RECOGNIZER``)."""
    if settings.embedding_backend == "arcface_ir_se50":
        return ArcFaceIRSE50Embedder(
            settings.resolved_arcface_weights_path, device=torch_device(settings.face_device)
        )
    if settings.face_recognizer:
        path = Path(settings.face_recognizer).expanduser()
        if not path.is_absolute():
            path = pack.path / path
        if not path.is_file():
            raise ModelWeightsError(
                f"recognition model {path} does not exist", setting="LYNX_FACE_RECOGNIZER"
            )
        # The pack's own recogniser named explicitly keeps the manifest's preprocessing.
        own = pack.recognizer is not None and pack.path / pack.recognizer.file == path
        preprocessing = pack.recognizer.preprocessing if own else None
        return OnnxArcFaceEmbedder(
            path, providers=providers, preprocessing=preprocessing, device=settings.face_device
        )
    if pack.recognizer is not None:
        return OnnxArcFaceEmbedder(
            pack.path / pack.recognizer.file, providers=providers,
            preprocessing=pack.recognizer.preprocessing, setting="LYNX_FACE_PACK",
            device=settings.face_device,
        )
    if routed is not None:
        return routed
    raise ModelWeightsError(
        f"face pack {pack.path} has no recognition model; set LYNX_FACE_RECOGNIZER or "
        "LYNX_EMBEDDING_BACKEND=arcface_ir_se50",
        setting="LYNX_FACE_PACK",
    )


def check_embedding_compatible(
    embedder: FaceEmbedder, expected_dim: int, *, expected_model: str | None = None
) -> None:
    """Refuse an embedder whose vectors an identity adapter cannot take.

    ``expected_dim`` is the adapter's input width (512 for the official Lynx resampler);
    ``expected_model``, when given, is the recogniser the adapter was trained with
    (``"arcface_ir_se50"`` for the official weights): another 512-d recogniser lives in a
    different embedding space and would pass a size check while giving a wrong identity.
    """
    if embedder.dim != expected_dim:
        hint = (
            "set LYNX_EMBEDDING_BACKEND=arcface_ir_se50 for the official Lynx adapters"
            if expected_dim == 512
            else "choose a recogniser (LYNX_EMBEDDING_BACKEND / LYNX_FACE_RECOGNIZER / LYNX_FACE_PACK) "
            f"that gives {expected_dim}-d embeddings"
        )
        raise ConfigurationError(
            f"the identity adapter takes {expected_dim}-d face embeddings but recogniser "
            f"{embedder.name!r} gives {embedder.dim}-d; {hint}",
            setting="LYNX_EMBEDDING_BACKEND",
        )
    if expected_model is not None and embedder.name != expected_model:
        raise ConfigurationError(
            f"the identity adapter was trained on {expected_model!r} embeddings, not on "
            f"{embedder.name!r}; set LYNX_EMBEDDING_BACKEND accordingly",
            setting="LYNX_EMBEDDING_BACKEND",
        )


@cached_per_configuration(
    lambda settings: (
        settings.resolved_face_pack_dir,
        settings.face_detector_size,
        settings.face_detection_threshold,
        settings.embedding_backend,
        settings.face_recognizer,
        settings.resolved_arcface_weights_path,
        settings.face_device,
    )
)
def cached_face_analyzer(settings: LynxSettings) -> FaceAnalyzer:
    """``load_face_analyzer``, once per process and configuration."""
    return load_face_analyzer(settings)


def _manifest_detector(
    pack: FacePack, model: PackModel, settings: LynxSettings, providers: list[str]
) -> FaceDetector:
    path = pack.path / model.file
    if model.kind == "yunet":
        return YuNetDetector(
            path, providers=providers, device=settings.face_device, input_size=settings.face_detector_size,
            score_threshold=settings.face_detection_threshold,
        )
    if model.kind == "insightface":
        routed = zoo_model(path, providers, settings.face_device)
        if getattr(routed, "taskname", None) != "detection":
            raise ModelWeightsError(f"{path} is not a face detector insightface recognises",
                                    setting="LYNX_FACE_PACK")
        return InsightFaceDetector(
            routed, input_size=settings.face_detector_size, score_threshold=settings.face_detection_threshold
        )
    raise ModelWeightsError(f"face pack {pack.path} names an unknown detector kind {model.kind!r}",
                            setting="LYNX_FACE_PACK")


def _route_insightface_pack(
    pack: FacePack, settings: LynxSettings, providers: list[str], *, find_recognizer: bool = True
) -> tuple[FaceDetector, OnnxArcFaceEmbedder | None]:
    """Let insightface's model zoo recognise the pack's detector and recogniser (as FaceAnalysis
    does); other models (landmarks, gender/age) are skipped."""
    from insightface.model_zoo.arcface_onnx import ArcFaceONNX

    detector = recognizer = None
    for path in sorted(pack.path.glob("*.onnx")):
        if detector is not None and (recognizer is not None or not find_recognizer):
            break
        try:
            model = zoo_model(path, providers, settings.face_device)
        except ConfigurationError:  # the session check's own error names LYNX_FACE_DEVICE
            raise
        except Exception as err:  # a damaged file: say which one
            raise ModelWeightsError(f"cannot load {path} ({err})", setting="LYNX_FACE_PACK") from err
        task = getattr(model, "taskname", None)
        if task == "detection" and detector is None:
            detector = InsightFaceDetector(
                model,
                input_size=settings.face_detector_size,
                score_threshold=settings.face_detection_threshold,
            )
        elif find_recognizer and recognizer is None and isinstance(model, ArcFaceONNX):
            recognizer = OnnxArcFaceEmbedder.from_model(model)
    if detector is None:
        raise ModelWeightsError(
            f"face pack {pack.path} has no face detection model", setting="LYNX_FACE_PACK"
        )
    return detector, recognizer


def _bgr(image_rgb: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(image_rgb[..., ::-1])
