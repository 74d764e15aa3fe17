"""YuNet, OpenCV's small face detector, run by onnxruntime with the result type of the stage.

insightface would route YuNet's twelve outputs to its SCRFD class, whose layout they do not
follow, so YuNet gets this wrapper. Decoding follows OpenCV's published YuNet post-processing:
one anchor per feature-map cell at strides 8/16/32; score = sqrt(class * objectness); box centre
= (cell + offset) * stride, size = exp(log-size) * stride; keypoints = (cell + offset) * stride.
The model reads BGR pixels 0..255 unnormalised.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import onnxruntime

from lynx.faces.runtime import check_session_device, session_options
from lynx.faces.types import DetectedFace

STRIDES = (8, 16, 32)


class YuNetDetector:
    """Finds faces with a YuNet ONNX whose spatial input axes are free (see ``onnx_repair``).

    ``device`` is LYNX_FACE_DEVICE: with 'cuda' a session that came up on CPU is refused."""

    name = "yunet"

    def __init__(
        self,
        model_path: str | Path,
        *,
        providers: list[str],
        device: str = "auto",
        input_size: int = 640,
        score_threshold: float = 0.5,
        nms_threshold: float = 0.3,
        max_faces: int = 5000,
    ) -> None:
        self.model_path = Path(model_path)
        self.session = onnxruntime.InferenceSession(
            str(self.model_path), sess_options=session_options(), providers=providers
        )
        check_session_device(self.session, device, self.model_path)
        self.input_name = self.session.get_inputs()[0].name
        outputs = [output.name for output in self.session.get_outputs()]
        expected = [f"{kind}_{stride}" for kind in ("cls", "obj", "bbox", "kps") for stride in STRIDES]
        if sorted(outputs) != sorted(expected):
            raise ValueError(f"{self.model_path} is not a YuNet model (outputs {outputs})")
        self.output_names = expected
        self.input_size = input_size
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold
        self.max_faces = max_faces

    def detect(self, image_bgr: np.ndarray) -> list[DetectedFace]:
        canvas, scale = self._letterbox(image_bgr)
        blob = canvas.transpose(2, 0, 1)[None].astype(np.float32)
        results = self.session.run(self.output_names, {self.input_name: blob})
        outputs = dict(zip(self.output_names, results, strict=True))
        boxes, scores, kps = self._decode(outputs, canvas.shape[0], canvas.shape[1])
        keep = self._nms(boxes, scores)
        return [
            DetectedFace(box=(boxes[i] / scale).astype(np.float32), score=float(scores[i]),
                         kps=(kps[i] / scale).astype(np.float32))
            for i in keep
        ]

    def _letterbox(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        """Fit the image into ``input_size`` keeping its aspect, padded at the right and bottom
        (insightface's SCRFD convention) to a multiple of the largest stride."""
        height, width = image.shape[:2]
        scale = self.input_size / max(height, width)
        new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
        resized = cv2.resize(image, (new_w, new_h)) if (new_w, new_h) != (width, height) else image
        pad = STRIDES[-1]
        canvas = np.zeros((-(-new_h // pad) * pad, -(-new_w // pad) * pad, 3), dtype=np.uint8)
        canvas[:new_h, :new_w] = resized
        return canvas, new_w / width

    def _decode(
        self, outputs: dict[str, np.ndarray], height: int, width: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        all_boxes, all_scores, all_kps = [], [], []
        for stride in STRIDES:
            rows, cols = height // stride, width // stride
            cls = outputs[f"cls_{stride}"].reshape(-1)
            obj = outputs[f"obj_{stride}"].reshape(-1)
            scores = np.sqrt(np.clip(cls, 0.0, 1.0) * np.clip(obj, 0.0, 1.0))
            hits = np.flatnonzero(scores >= self.score_threshold)
            if hits.size == 0:
                continue
            cells = np.stack([hits % cols, hits // cols], axis=1).astype(np.float32)  # (x, y)
            bbox = outputs[f"bbox_{stride}"].reshape(rows * cols, 4)[hits]
            centres = (cells + bbox[:, :2]) * stride
            sizes = np.exp(bbox[:, 2:]) * stride
            all_boxes.append(np.concatenate([centres - sizes / 2, centres + sizes / 2], axis=1))
            points = outputs[f"kps_{stride}"].reshape(rows * cols, 5, 2)[hits]
            all_kps.append((points + cells[:, None, :]) * stride)
            all_scores.append(scores[hits])
        if not all_scores:
            return np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros((0, 5, 2), np.float32)
        return np.concatenate(all_boxes), np.concatenate(all_scores), np.concatenate(all_kps)

    def _nms(self, boxes: np.ndarray, scores: np.ndarray) -> list[int]:
        if len(scores) == 0:
            return []
        xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
        keep = cv2.dnn.NMSBoxes(
            xywh.tolist(), scores.tolist(), self.score_threshold, self.nms_threshold, top_k=self.max_faces
        )
        return [int(i) for i in np.asarray(keep).reshape(-1)]
