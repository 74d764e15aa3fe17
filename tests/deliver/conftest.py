"""Fixtures of the deliverables tests: synthetic videos, real media files, tiny real models.

Everything runs through the real tools: frames are encoded by the real ffmpeg, audio files are made
by ffmpeg's own generators, the safety classifier is a real ONNX graph run by onnxruntime, and the
Real-ESRGAN weights are random tensors saved in the official file layout.

``LocalFolderStore`` implements the artifact-store interface of ``lynx.store`` on a folder. It
exists only because ``lynx.store`` is built in parallel; on merge these tests switch to the real
store (``lynx.store.local.LocalArtifactStore``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pytest
from PIL import Image

from lynx.errors import NotFoundError
from lynx.media.ffmpeg import ffmpeg_exe
from lynx.media.provenance import InputArtifact, ModelInfo, Provenance
from lynx.settings import get_settings


@pytest.fixture(autouse=True)
def _no_outer_lynx_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Settings in these tests come from the test, never from the developer's environment."""
    for name in list(os.environ):
        if name.startswith("LYNX_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("LYNX_HOME", str(tmp_path / "lynx-home"))
    get_settings.cache_clear()  # the CLI reads the cached settings object
    yield
    get_settings.cache_clear()


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


# --- artifact store stand-in ------------------------------------------------------------------
@dataclass(frozen=True)
class StoredObject:
    key: str
    sha256: str
    size: int
    content_type: str = "application/octet-stream"


class LocalFolderStore:
    """The ``lynx.store`` interface on a folder; records the order of uploads for the tests."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.uploads: list[str] = []
        self._meta: dict[str, StoredObject] = {}

    def _path(self, key: str) -> Path:
        return self.root / key

    def put_file(
        self, path: Path, *, key: str | None = None, content_type: str | None = None
    ) -> StoredObject:
        data = Path(path).read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        key = key or f"sha256/{digest[:2]}/{digest}"
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        obj = StoredObject(
            key,
            hashlib.sha256(target.read_bytes()).hexdigest(),
            target.stat().st_size,
            content_type or "application/octet-stream",
        )
        self._meta[key] = obj
        self.uploads.append(key)
        return obj

    def stat(self, key: str) -> StoredObject:
        if key not in self._meta:
            raise NotFoundError(f"no artifact {key}")
        return self._meta[key]

    def exists(self, key: str) -> bool:
        return key in self._meta

    def get_file(self, key: str, dest: Path) -> StoredObject:
        shutil.copyfile(self._path(self.stat(key).key), dest)
        return self._meta[key]

    def delete(self, key: str) -> None:
        self._meta.pop(key, None)
        self._path(key).unlink(missing_ok=True)

    @contextmanager
    def open_read(self, key: str) -> Iterator[BinaryIO]:
        with open(self._path(self.stat(key).key), "rb") as handle:
            yield handle

    def keys(self) -> list[str]:
        return sorted(self._meta)


@pytest.fixture
def store(tmp_path: Path) -> LocalFolderStore:
    return LocalFolderStore(tmp_path / "store")


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
