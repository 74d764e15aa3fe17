"""Fixtures of the deliverables tests: synthetic videos, real media files, tiny real models.

Everything runs through the real tools: frames are encoded by the real ffmpeg, audio files are made
by ffmpeg's own generators, the safety classifier is a real ONNX graph run by onnxruntime, and the
Real-ESRGAN weights are random tensors saved in the official file layout.

Publishing runs against the real artifact stores of the root conftest (a local folder and a SeaweedFS S3
server), wrapped by ``RecordingStore`` to observe upload order and to inject failures.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lynx.media.ffmpeg import ffmpeg_exe
from lynx.media.provenance import InputArtifact, ModelInfo, Provenance
from lynx.store import ArtifactStore, StoredObject


def synthetic_frames(count: int, height: int, width: int, *, brightness: float = 1.0) -> Iterator[np.ndarray]:
    """Smooth test video: a colour gradient with a disc moving left to right (a generator, like decode)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width, y / height, 0.5 + 0.25 * np.sin(x / width * np.pi)], axis=-1)
    radius = max(3.0, height / 6)
    for index in range(count):
        cx = width * (0.2 + 0.6 * index / max(count - 1, 1))
        disc = ((x - cx) ** 2 + (y - height / 2) ** 2 < radius**2)[..., None]
        frame = np.where(disc, np.array([1.0, 0.9, 0.2], np.float32), base) * brightness
        yield (np.clip(frame, 0, 1) * 255 + 0.5).astype(np.uint8)


def flat_frames(count: int, height: int, width: int) -> Iterator[np.ndarray]:
    """Frames of one flat grey level each, rising by 8 per frame: which source frame is shown is readable."""
    for index in range(count):
        yield np.full((height, width, 3), 16 + 8 * index, np.uint8)


@pytest.fixture(scope="session")
def ffmpeg() -> str:
    return ffmpeg_exe()


@pytest.fixture(scope="session")
def make_audio(ffmpeg: str, tmp_path_factory: pytest.TempPathFactory) -> Callable[[float, str], Path]:
    """Factory: a sine tone of ``seconds`` in the given container (wav, m4a, mp3), made by ffmpeg."""
    folder = tmp_path_factory.mktemp("audio")

    def make(seconds: float, extension: str = "wav") -> Path:
        path = folder / f"tone-{seconds:g}.{extension}"
        if not path.exists():
            subprocess.run(
                [
                    ffmpeg,
                    "-loglevel",
                    "error",
                    "-y",
                    "-f",
                    "lavfi",
                    "-i",
                    f"sine=frequency=440:duration={seconds}",
                    "-ac",
                    "1",
                    str(path),
                ],
                check=True,
            )
        return path

    return make


@pytest.fixture(scope="session")
def logo_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An opaque pure-red 40x20 logo with a transparent border."""
    image = np.zeros((24, 44, 4), np.uint8)
    image[2:22, 2:42] = (255, 0, 0, 255)
    path = tmp_path_factory.mktemp("logo") / "logo.png"
    Image.fromarray(image, "RGBA").save(path)
    return path


@pytest.fixture
def provenance() -> Provenance:
    return Provenance(
        job_id="job-0001",
        campaign="spring",
        subject_ref="subject:42",
        prompt="a person walking on a beach",
        negative_prompt="blurry",
        seed=1234,
        model=ModelInfo(variant="full", version="test-fingerprint"),
        settings={"steps": 4, "guidance": 5.0},
        inputs=(InputArtifact(key="inputs/ref.png", sha256="0" * 64, role="reference_image"),),
    )


# --- artifact store ------------------------------------------------------------------------------
class RecordingStore:
    """A real artifact store that remembers the order of its uploads and can be told to fail.

    Wraps ``lynx.store`` (the root conftest's ``store``: local folder and SeaweedFS S3), so publishing is
    tested against the real backends; ``fail_at`` makes the n-th upload raise as a dropped connection
    would, ``corrupt`` makes ``stat`` report other bytes than were sent for keys ending with it.
    """

    def __init__(self, inner: ArtifactStore, *, fail_at: int | None = None, corrupt: str | None = None):
        self.inner = inner
        self.fail_at = fail_at
        self.corrupt = corrupt
        self.uploads: list[str] = []

    def put_file(
        self, path: Path, *, key: str | None = None, content_type: str | None = None
    ) -> StoredObject:
        if self.fail_at is not None and len(self.uploads) + 1 == self.fail_at:
            raise ConnectionError("connection reset by peer")
        stored = self.inner.put_file(path, key=key, content_type=content_type)
        self.uploads.append(stored.key)
        return stored

    def stat(self, key: str) -> StoredObject:
        stored = self.inner.stat(key)
        if self.corrupt and key.endswith(self.corrupt):
            return replace(stored, sha256="f" * 64)
        return stored

    def keys(self) -> list[str]:
        return sorted(self.inner.list())

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


@pytest.fixture
def store(store: ArtifactStore) -> RecordingStore:
    """The root conftest's real store (local and S3), recording its uploads."""
    return RecordingStore(store)


# --- a tiny real ONNX classifier ----------------------------------------------------------------
@pytest.fixture(scope="session")
def make_brightness_classifier(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory: an ONNX 'unsafe' classifier whose logit rises with mean brightness.

    logits = [0, k * (mean(x) - bias)] over the normalised input, so with the symmetric
    normalisation a bright frame (mean ~0.9) scores ~1 and a dark one (~0.2) ~0.
    """
    import onnx
    from onnx import TensorProto, helper

    folder = tmp_path_factory.mktemp("safety")

    def make(
        layout: str = "nchw", size: int = 32, batch: int | str = "N", bias: float = 0.3, gain: float = 20.0
    ) -> Path:
        shape = [batch, 3, size, size] if layout == "nchw" else [batch, size, size, 3]
        const = lambda name, value: helper.make_tensor(name, TensorProto.FLOAT, [], [value])  # noqa: E731
        graph = helper.make_graph(
            [
                helper.make_node("ReduceMean", ["pixels"], ["mean"], axes=[1, 2, 3], keepdims=0),
                helper.make_node("Reshape", ["mean", "column"], ["mean2d"]),
                helper.make_node("Sub", ["mean2d", "bias"], ["centred"]),
                helper.make_node("Mul", ["centred", "gain"], ["unsafe"]),
                helper.make_node("Mul", ["unsafe", "zero"], ["safe"]),
                helper.make_node("Concat", ["safe", "unsafe"], ["logits"], axis=1),
            ],
            "brightness_classifier",
            [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, shape)],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 2])],
            initializer=[
                const("bias", bias),
                const("gain", gain),
                const("zero", 0.0),
                helper.make_tensor("column", TensorProto.INT64, [2], [-1, 1]),
            ],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        onnx.checker.check_model(model)
        path = folder / f"brightness-{layout}-{size}-{batch}.onnx"
        onnx.save(model, path)
        return path

    return make
