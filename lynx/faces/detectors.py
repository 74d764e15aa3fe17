"""Face detectors with the stage's result type: insightface's model-zoo detectors and YuNet."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lynx.errors import ModelWeightsError
from lynx.faces.types import DetectedFace


class InsightFaceDetector:
    """An insightface model-zoo detector (SCRFD or RetinaFace, e.g. buffalo_l's det_10g.onnx).

    Wraps the already-routed insightface object so its arrays become ``DetectedFace`` values;
    detection, letterboxing and NMS are insightface's own.
    """

    def __init__(self, model: Any, *, input_size: int = 640, score_threshold: float = 0.5) -> None:
        model_file = Path(getattr(model, "model_file", "detector.onnx"))
        if not getattr(model, "use_kps", False):
            raise ModelWeightsError(
                f"detector {model_file.name} gives no facial keypoints; alignment needs a "
                "keypoint model such as buffalo_l's det_10g.onnx",
                setting="LYNX_FACE_PACK",
            )
        model.prepare(0, input_size=(input_size, input_size), det_thresh=score_threshold)
        self.model = model
        self.name = model_file.stem
        self.input_size = input_size

    def detect(self, image_bgr: np.ndarray) -> list[DetectedFace]:
        boxes, kpss = self.model.detect(image_bgr, input_size=(self.input_size, self.input_size))
        return [
            DetectedFace(
                box=np.asarray(boxes[i, :4], dtype=np.float32),
                score=float(boxes[i, 4]),
                kps=np.asarray(kpss[i], dtype=np.float32).reshape(5, 2),
            )
            for i in range(boxes.shape[0])
        ]
