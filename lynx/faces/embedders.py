"""Identity embedding backends behind one interface (``FaceEmbedder``).

* ``OnnxArcFaceEmbedder``: any insightface-compatible recognition ONNX (w600k_r50, glintr100,
  SFace...), run by insightface's own ``ArcFaceONNX`` wrapper.
* ``ArcFaceIRSE50Embedder``: facexlib's IR-SE50 in torch, the embedding the official Lynx
  adapters expect.

Both take ArcFace-aligned BGR crops of their ``input_size`` (112 for IR-SE50, read from the
graph for ONNX) and return L2-normalised float32 vectors; the embedding size is read from the
model.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lynx.errors import ConfigurationError, ModelWeightsError
from lynx.faces.runtime import zoo_model
from lynx.faces.types import l2_normalise

ARCFACE_IR_SE50_NAME = "arcface_ir_se50"


def _as_batch(aligned_bgr: np.ndarray, size: int) -> tuple[np.ndarray, bool]:
    crops = np.asarray(aligned_bgr)
    single = crops.ndim == 3
    if single:
        crops = crops[None]
    if crops.ndim != 4 or crops.shape[1:] != (size, size, 3):
        raise ValueError(f"expected aligned {size}x{size} BGR crops, got an array of shape {crops.shape}")
    return crops, single


class OnnxArcFaceEmbedder:
    """A recognition ONNX wrapped by insightface's ``ArcFaceONNX``.

    ``preprocessing`` is insightface 2.x's explicit metadata: ``"embedded"`` when the graph
    normalises pixels itself (SFace), ``{"mean": m, "std": s}`` otherwise, or None to let
    insightface guess from the graph as it does for its own packs. ``device`` is LYNX_FACE_DEVICE:
    with 'cuda' a session that came up on CPU is refused.
    """

    def __init__(
        self,
        model_path: str | Path,
        *,
        providers: list[str],
        preprocessing: str | Mapping[str, float] | None = None,
        setting: str = "LYNX_FACE_RECOGNIZER",
        device: str = "auto",
    ) -> None:
        from insightface.model_zoo.arcface_onnx import ArcFaceONNX

        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise ModelWeightsError(f"recognition model {self.model_path} does not exist", setting=setting)
        options: dict[str, Any] = {}
        if preprocessing is not None:
            options |= {"model_task": "recognition", "model_metadata": {"preprocessing": preprocessing}}
        try:
            model = zoo_model(self.model_path, providers, device, **options)
        except ConfigurationError:  # the session check's own error names LYNX_FACE_DEVICE
            raise
        except Exception as err:  # onnx/onnxruntime raise many types for a damaged file
            raise ModelWeightsError(
                f"cannot load recognition model {self.model_path}: {err}", setting=setting
            ) from err
        if not isinstance(model, ArcFaceONNX):
            raise ModelWeightsError(
                f"{self.model_path} is not a face recognition model (insightface sees "
                f"{type(model).__name__ if model is not None else 'an unknown model'})",
                setting=setting,
            )
        self._attach(model, setting)

    @classmethod
    def from_model(cls, model: Any) -> OnnxArcFaceEmbedder:
        """Wrap an ``ArcFaceONNX`` that insightface's model zoo already loaded."""
        embedder = cls.__new__(cls)
        embedder.model_path = Path(model.model_file)
        embedder._attach(model, "LYNX_FACE_PACK")
        return embedder

    def _attach(self, model: Any, setting: str) -> None:
        width, height = model.input_size
        # Alignment templates exist only for these sizes (see ``align.template_for_size``).
        if width != height or not isinstance(width, int) or (width % 112 and width % 128):
            raise ModelWeightsError(
                f"{self.model_path} takes {width}x{height} face crops; the face stage aligns square "
                "crops whose side is a multiple of 112 or 128",
                setting=setting,
            )
        self.model = model
        self.name = self.model_path.stem
        self.dim = int(model.output_shape[-1])
        self.input_size = width
        batch_axis = model.input_shape[0]
        self._fixed_batch = batch_axis if isinstance(batch_axis, int) else None

    def embed(self, aligned_bgr: np.ndarray) -> np.ndarray:
        crops, single = _as_batch(aligned_bgr, self.input_size)
        if self._fixed_batch is not None:  # a graph exported for one crop at a time
            features = np.concatenate([self.model.get_feat(crop) for crop in crops])
        else:
            features = self.model.get_feat(list(crops))
        features = l2_normalise(features.reshape(len(crops), -1))
        return features[0] if single else features


class ArcFaceIRSE50Embedder:
    """facexlib's IR-SE50 (``recognition_arcface_ir_se50.pth``) in torch; 512-d."""

    name = ARCFACE_IR_SE50_NAME
    input_size = 112

    def __init__(
        self,
        weights_path: str | Path,
        *,
        device: str = "cpu",
        setting: str = "LYNX_ARCFACE_WEIGHTS_PATH",
    ) -> None:
        import torch

        from lynx.faces.irse50 import IRSE50

        self.weights_path = Path(weights_path)
        if not self.weights_path.is_file():
            raise ModelWeightsError(
                f"IR-SE50 weights {self.weights_path} do not exist; copy facexlib's "
                "recognition_arcface_ir_se50.pth there",
                setting=setting,
            )
        try:
            state = torch.load(self.weights_path, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
                state = state["state_dict"]
            module = IRSE50()
            module.load_state_dict(state, strict=True)
        except Exception as err:  # truncated pickle, wrong keys or shapes: all mean a wrong file
            raise ModelWeightsError(
                f"{self.weights_path} is not facexlib's IR-SE50 state dict ({_first_line(err)})",
                setting=setting,
            ) from err
        self.device = torch.device(device)
        self.module = module.eval().to(self.device)
        self.dim = module.embedding_dim

    def embed(self, aligned_bgr: np.ndarray) -> np.ndarray:
        import torch

        crops, single = _as_batch(aligned_bgr, self.input_size)
        pixels = torch.from_numpy(np.ascontiguousarray(crops)).to(self.device)
        # BGR kept as is; [0, 255] -> [-1, 1] (LYNX_SPEC 2.2).
        batch = pixels.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        with torch.inference_mode():
            features = self.module(batch).float().cpu().numpy()
        features = l2_normalise(features)
        return features[0] if single else features


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0][:200] if lines else type(err).__name__
