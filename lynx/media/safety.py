"""Content-safety gate: score sampled frames with an image classifier and block above a threshold.

Any object with ``name`` and ``score_frames`` is a checker (``SafetyChecker``); the one shipped
loads an ONNX image classifier (e.g. an NSFW detector exported to ONNX) from the models folder.
Without a configured classifier the verdict is ``not_checked``: the record never claims a pass
that no model gave.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict

from lynx.errors import ModelWeightsError
from lynx.media.errors import SafetyBlockedError

_SETTING = "LYNX_DELIVER_SAFETY_MODEL"
# Most exported classifiers (ViT, ResNet) have dynamic spatial axes; they were trained at 224.
_DEFAULT_INPUT_SIZE = 224
_NORMALIZATION = {
    "symmetric": (np.full(3, 0.5, np.float32), np.full(3, 0.5, np.float32)),
    "imagenet": (np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)),
    "unit": (np.zeros(3, np.float32), np.ones(3, np.float32)),
}


@runtime_checkable
class SafetyChecker(Protocol):
    """Scores frames: one probability of 'unsafe' in [0, 1] per frame."""

    name: str

    def score_frames(self, frames: Sequence[np.ndarray]) -> np.ndarray: ...


class SafetyVerdict(BaseModel):
    model_config = ConfigDict(frozen=True)

    status: Literal["passed", "blocked", "not_checked"]
    score: float | None = None
    threshold: float
    model: str | None = None
    frames_checked: int = 0


class OnnxImageClassifierSafety:
    """An ONNX image classifier as a safety checker.

    The input layout (NCHW or NHWC) and size are read from the model; which output column means
    "unsafe", whether outputs are logits, and the pixel normalisation are settings because
    exported classifiers differ in all three.
    """

    def __init__(
        self,
        path: Path,
        *,
        unsafe_index: int = 1,
        output: Literal["logits", "probabilities"] = "logits",
        normalization: Literal["symmetric", "imagenet", "unit"] = "symmetric",
        providers: list[str] | None = None,
    ) -> None:
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise ModelWeightsError(f"safety classifier {path} does not exist", setting=_SETTING)
        available = ort.get_available_providers()
        providers = providers or [
            p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available
        ]
        try:
            self._session = ort.InferenceSession(str(path), providers=providers)
        except Exception as err:  # onnxruntime raises its own untyped errors for bad files
            raise ModelWeightsError(
                f"safety classifier {path} cannot be loaded: {err}", setting=_SETTING
            ) from None
        self.name = path.name
        self._input = self._session.get_inputs()[0]
        self._channels_first, self._size = self._layout(self._input.shape, path)
        batch = self._input.shape[0]
        if isinstance(batch, int) and batch != 1:
            raise ModelWeightsError(
                f"safety classifier {path.name} takes batches of exactly {batch}; export it with batch 1 "
                "or a dynamic batch axis",
                setting=_SETTING,
            )
        self._fixed_batch = isinstance(batch, int)
        classes = self._session.get_outputs()[0].shape[-1]
        if isinstance(classes, int) and not 0 <= unsafe_index < classes:
            raise ModelWeightsError(
                f"safety classifier {path.name} has {classes} classes; "
                f"unsafe index {unsafe_index} is out of range",
                setting="LYNX_DELIVER_SAFETY_UNSAFE_INDEX",
            )
        self._unsafe_index, self._output = unsafe_index, output
        self._mean, self._std = _NORMALIZATION[normalization]

    @staticmethod
    def _layout(shape: list, path: Path) -> tuple[bool, tuple[int, int]]:
        if len(shape) != 4:
            raise ModelWeightsError(
                f"safety classifier {path.name} takes input {shape}, not an image batch", setting=_SETTING
            )
        if shape[1] == 3:
            channels_first, (height, width) = True, shape[2:]
        elif shape[3] == 3:
            channels_first, (height, width) = False, shape[1:3]
        else:
            raise ModelWeightsError(
                f"safety classifier {path.name} input {shape} has no 3-channel axis", setting=_SETTING
            )
        size = tuple(d if isinstance(d, int) and d > 0 else _DEFAULT_INPUT_SIZE for d in (height, width))
        return channels_first, size

    def _prepare(self, frame: np.ndarray) -> np.ndarray:
        height, width = self._size
        image = cv2.resize(frame, (width, height), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
        image = (image - self._mean) / self._std
        return image.transpose(2, 0, 1) if self._channels_first else image

    def score_frames(self, frames: Sequence[np.ndarray]) -> np.ndarray:
        batch = np.stack([self._prepare(f) for f in frames])
        chunks = [batch[i : i + 1] for i in range(len(batch))] if self._fixed_batch else [batch]
        outputs = np.concatenate([self._session.run(None, {self._input.name: c})[0] for c in chunks])
        outputs = outputs.reshape(len(batch), -1).astype(np.float64)
        if self._output == "logits":
            outputs = np.exp(outputs - outputs.max(axis=1, keepdims=True))
            outputs /= outputs.sum(axis=1, keepdims=True)
        return outputs[:, self._unsafe_index]


class SafetyGate:
    """Screens every ``stride``-th frame of a stream as it passes and keeps the highest score.

    ``screen`` wraps the frame iterator so frames are scored on the way to the encoder, without
    a second pass and without holding frames; ``verdict`` then decides.
    """

    def __init__(self, checker: SafetyChecker | None, *, threshold: float, stride: int) -> None:
        self.checker, self.threshold, self.stride = checker, threshold, stride
        self._scores: list[float] = []

    def screen(self, frames: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        for index, frame in enumerate(frames):
            if self.checker is not None and index % self.stride == 0:
                self._scores.extend(float(s) for s in self.checker.score_frames([frame]))
            yield frame

    def verdict(self) -> SafetyVerdict:
        if self.checker is None or not self._scores:
            return SafetyVerdict(status="not_checked", threshold=self.threshold)
        score = max(self._scores)
        status = "blocked" if score > self.threshold else "passed"
        return SafetyVerdict(
            status=status,
            score=score,
            threshold=self.threshold,
            model=self.checker.name,
            frames_checked=len(self._scores),
        )

    def enforce(self) -> SafetyVerdict:
        """The verdict, raising ``SafetyBlockedError`` when it blocks."""
        verdict = self.verdict()
        if verdict.status == "blocked":
            raise SafetyBlockedError(
                f"content-safety classifier {verdict.model} scored {verdict.score:.3f} "
                f"> threshold {verdict.threshold}: deliverables blocked",
                verdict=verdict,
                setting="LYNX_DELIVER_SAFETY_THRESHOLD",
            )
        return verdict
