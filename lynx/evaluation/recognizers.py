"""The face models an evaluation runs: one detector and every configured recogniser.

``LYNX_EVAL_RECOGNIZERS`` lists recognisers as specs:

* ``"pack"``: the face pack's own recogniser (SFace in the demo pack, w600k_r50 in buffalo_l);
* ``"arcface_ir_se50"``: facexlib's IR-SE50 at ``LYNX_ARCFACE_WEIGHTS_PATH`` (the paper's
  "facexlib ArcFace" and the embedding the official adapters use);
* any other string: a recognition ONNX, a file name inside the pack or a path (glintr100.onnx...);
* ``{"path": ..., "name": ..., "preprocessing": ...}``: the same with a display name and explicit
  insightface 2.x preprocessing (``"embedded"`` or ``{"mean": m, "std": s}``).

Faces are detected once per frame with the pack's detector; every recogniser embeds the same
aligned crop. A recogniser that cannot be loaded is an error, never silently left out: a report
missing a recogniser would compare numbers that were never measured.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lynx.caching import cached_per_configuration
from lynx.errors import ConfigurationError, ModelWeightsError
from lynx.faces import ArcFaceIRSE50Embedder, FaceDetector, FaceEmbedder, OnnxArcFaceEmbedder
from lynx.faces.analyzer import load_face_analyzer
from lynx.faces.embedders import ARCFACE_IR_SE50_NAME
from lynx.faces.pack import FacePack
from lynx.faces.runtime import onnx_providers, torch_device
from lynx.settings import LynxSettings

SETTING = "LYNX_EVAL_RECOGNIZERS"
PACK_SPEC = "pack"


@dataclass(frozen=True)
class RecognizerSpec:
    """One entry of ``LYNX_EVAL_RECOGNIZERS``, parsed."""

    text: str  # as configured (a string, or the object as compact JSON): what the gate setting may name
    kind: str  # "pack" | "arcface_ir_se50" | "onnx"
    path: str | None = None
    name: str | None = None
    preprocessing: str | dict[str, float] | None = None

    @classmethod
    def parse(cls, raw: str | Mapping[str, Any]) -> RecognizerSpec:
        if isinstance(raw, str):
            text = raw.strip()
            if text == PACK_SPEC:
                return cls(text=text, kind="pack")
            if text == ARCFACE_IR_SE50_NAME:
                return cls(text=text, kind="arcface_ir_se50", name=ARCFACE_IR_SE50_NAME)
            return cls(text=text, kind="onnx", path=text)
        return cls(
            text=json.dumps(dict(raw), sort_keys=True, separators=(",", ":")),
            kind="onnx",
            path=str(raw["path"]),
            name=raw.get("name"),
            preprocessing=raw.get("preprocessing"),
        )


@dataclass
class EvaluationModels:
    """The detector and the recognisers of one evaluation, recognisers by display name in order."""

    detector: FaceDetector
    recognizers: dict[str, FaceEmbedder]
    specs: dict[str, RecognizerSpec]
    setup: dict[str, Any]  # what the numbers depend on; stored beside them

    @property
    def names(self) -> list[str]:
        return list(self.recognizers)

    def resolve(self, wanted: str | None, *, setting: str = "LYNX_QUALITY_GATE_RECOGNIZER") -> str:
        """The display name of the recogniser ``wanted`` names (a name or a spec); None: the first."""
        if wanted is None:
            return self.names[0]
        for name, spec in self.specs.items():
            if wanted in (name, spec.text, spec.path):
                return name
        raise ConfigurationError(
            f"recogniser {wanted!r} is not among the evaluation recognisers "
            f"({', '.join(self.names)}); add it to LYNX_EVAL_RECOGNIZERS or name one of those",
            setting=setting,
        )


def load_evaluation_models(settings: LynxSettings) -> EvaluationModels:
    """Load the pack's detector and every configured recogniser; raise ModelWeightsError naming the
    setting for any that is missing or damaged."""
    specs = [RecognizerSpec.parse(raw) for raw in settings.eval_recognizers]
    providers = onnx_providers(settings.face_device)
    pack = FacePack.read(settings.resolved_face_pack_dir)
    detector: FaceDetector | None = None
    recognizers: dict[str, FaceEmbedder] = {}
    by_name: dict[str, RecognizerSpec] = {}
    for spec in specs:
        if spec.kind == "pack":
            # The pack's recogniser comes with its detector (insightface packs route both at once).
            own = load_face_analyzer(
                settings.model_copy(update={"embedding_backend": "onnx", "face_recognizer": None})
            )
            detector, embedder = own.detector, own.embedder
        else:
            embedder = _load_recognizer(spec, settings, pack, providers)
        name = spec.name or embedder.name
        if name in recognizers:
            raise ConfigurationError(
                f"two evaluation recognisers are both called {name!r}; give one a name: "
                '{"path": ..., "name": "..."}',
                setting=SETTING,
            )
        recognizers[name], by_name[name] = embedder, spec
    if detector is None:
        detector = load_face_analyzer(settings, recognizer=next(iter(recognizers.values()))).detector
    return EvaluationModels(detector, recognizers, by_name, _setup(settings, by_name, recognizers))


@cached_per_configuration(
    lambda settings: (
        settings.resolved_face_pack_dir,
        settings.face_detector_size,
        settings.face_detection_threshold,
        json.dumps(settings.eval_recognizers, sort_keys=True),
        settings.resolved_arcface_weights_path,
        settings.face_device,
    )
)
def cached_evaluation_models(settings: LynxSettings) -> EvaluationModels:
    """``load_evaluation_models``, once per process and configuration."""
    return load_evaluation_models(settings)


def _load_recognizer(
    spec: RecognizerSpec, settings: LynxSettings, pack: FacePack, providers: list[str]
) -> FaceEmbedder:
    if spec.kind == "arcface_ir_se50":
        try:
            return ArcFaceIRSE50Embedder(
                settings.resolved_arcface_weights_path, device=torch_device(settings.face_device)
            )
        except ModelWeightsError as err:
            raise ModelWeightsError(
                f"evaluation recogniser 'arcface_ir_se50' (listed in {SETTING}): {err.message}",
                setting=err.setting,
            ) from err
    path = Path(spec.path or "").expanduser()
    if not path.is_absolute():
        path = pack.path / path
    if not path.is_file():
        raise ModelWeightsError(
            f"evaluation recogniser {spec.text!r}: recognition model {path} does not exist "
            f"(a relative name is looked up in the face pack {pack.path})",
            setting=SETTING,
        )
    preprocessing = spec.preprocessing
    if preprocessing is None and pack.recognizer is not None and pack.path / pack.recognizer.file == path:
        preprocessing = pack.recognizer.preprocessing  # the pack's own file keeps its metadata
    return OnnxArcFaceEmbedder(
        path, providers=providers, preprocessing=preprocessing, setting=SETTING, device=settings.face_device
    )


def _setup(
    settings: LynxSettings, specs: Mapping[str, RecognizerSpec], recognizers: Mapping[str, FaceEmbedder]
) -> dict[str, Any]:
    """The configuration a stored measurement is valid for: detector settings plus each recogniser's
    spec and embedding size. Model files are identified by path, not hashed (a 250 MB glintr100
    would cost more to hash than to run on a short clip)."""
    return {
        "face_pack": settings.face_pack,
        "detector_size": settings.face_detector_size,
        "detection_threshold": settings.face_detection_threshold,
        "recognizers": {
            name: {"spec": specs[name].text, "dim": int(recognizers[name].dim)} for name in recognizers
        },
    }


def setup_for(setup: Mapping[str, Any], recognizer: str) -> dict[str, Any]:
    """The part of ``setup`` one recogniser's stored numbers depend on."""
    return {
        **{k: v for k, v in setup.items() if k != "recognizers"},
        "recognizer": setup["recognizers"][recognizer],
    }
