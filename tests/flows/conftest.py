"""Fixtures of the flow tests: one Prefect test harness, the tiny model, real faces, real services.

Flows read their configuration from LYNX_* variables, as workers do, so ``flow_env`` sets them:
a fresh PostgreSQL database and a fresh bucket on the SeaweedFS S3 server per test, the tiny random
model (written once per session through the model's own writer, for the demo face pack's 128-d
embeddings) and the real demo face pack. Per-process caches (services, conditioning, the loaded
model) are reset between tests so that counts of computed results start from zero.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import insightface
import numpy as np
import pytest
import skimage.data
from PIL import Image

from lynx.assets import demo_face_path
from lynx.jobs import GenerationSettings
from lynx.settings import get_settings
from tests.conftest import S3_ACCESS_KEY, S3_SECRET_KEY, S3_TEST_PART_SIZE, cache_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DEMO_EMBEDDING_DIM = 128  # the demo face pack's SFace recogniser
#: Small enough that one job's GPU stages take about a second on 2 cores.
TINY_SETTINGS = GenerationSettings(frames=5, height=64, width=64, steps=2)


@pytest.fixture(scope="session")
def tiny_model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny random Lynx models (base + lynx_full + lynx_lite) for 128-d face embeddings."""
    from lynx_model.testing import TinyModelSpec, write_tiny_models

    root = cache_dir(request, tmp_path_factory, "lynx-flows-tiny-model")
    write_tiny_models(root, variant="both", spec=TinyModelSpec(face_dim=DEMO_EMBEDDING_DIM))
    return root


@pytest.fixture(scope="session")
def photos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real face photos (two people) and a photo without a face, as JPEG files."""
    folder = tmp_path_factory.mktemp("photos")
    insightface_images = Path(insightface.__file__).parent / "data" / "images"
    hanks = cv2.imread(str(insightface_images / "Tom_Hanks_54745.png"))
    hanks = cv2.copyMakeBorder(hanks, 100, 100, 100, 100, cv2.BORDER_CONSTANT, value=(0, 0, 0))
    cv2.imwrite(str(folder / "hanks.jpg"), hanks)
    texture = np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    Image.fromarray(texture).save(folder / "noface.jpg")
    return {"astronaut": demo_face_path(), "hanks": folder / "hanks.jpg", "noface": folder / "noface.jpg"}


@pytest.fixture(scope="session")
def second_shot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The astronaut again, another shot: mirrored, turned 12 degrees, smaller, a low-quality JPEG."""
    image = skimage.data.astronaut()[:, ::-1, ::-1]  # mirrored, as BGR for OpenCV
    h, w = image.shape[:2]
    turned = cv2.warpAffine(
        np.ascontiguousarray(image), cv2.getRotationMatrix2D((w / 2, h / 2), 12, 1.0), (w, h)
    )
    path = tmp_path_factory.mktemp("shots") / "eileen-2.jpg"
    cv2.imwrite(str(path), cv2.resize(turned, (int(w * 0.8), int(h * 0.8))), [cv2.IMWRITE_JPEG_QUALITY, 40])
    return path


def reset_process_state() -> None:
    from tasks.cache import memory
    from tasks.model import _loaded
    from tasks.services import reset_services

    reset_services()
    memory.clear()
    _loaded.clear()
    get_settings.cache_clear()


@pytest.fixture
def flow_env(
    prefect_harness: None,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    make_pg_database: Callable[[], str],
    s3_server: str,
    face_models_dir: Path,
    tiny_model_dir: Path,
) -> Iterator[Callable[..., dict[str, str]]]:
    """``flow_env(**overrides)`` sets the LYNX_* environment of a flow run and returns it.

    Defaults: PostgreSQL (fresh database), S3 on SeaweedFS (fresh bucket), the tiny full model, the demo
    face pack on the CPU, no retry delays. Overrides are setting names, e.g. ``gpu_batch_size=2``.
    """

    def configure(**overrides: object) -> dict[str, str]:
        env = {
            "LYNX_HOME": str(tmp_path / "home"),
            "LYNX_DATABASE_URL": make_pg_database(),
            "LYNX_STORE_BACKEND": "s3",
            "LYNX_S3_ENDPOINT": s3_server,
            "LYNX_S3_SECURE": "false",
            "LYNX_S3_ACCESS_KEY": S3_ACCESS_KEY,
            "LYNX_S3_SECRET_KEY": S3_SECRET_KEY,
            "LYNX_S3_BUCKET": f"lynx-flows-{secrets.token_hex(4)}",
            "LYNX_S3_PART_SIZE": str(S3_TEST_PART_SIZE),
            "LYNX_MODELS_DIR": str(face_models_dir),
            "LYNX_FACE_DEVICE": "cpu",
            "LYNX_BASE_MODEL_PATH": str(tiny_model_dir / "base"),
            "LYNX_ADAPTER_PATH": str(tiny_model_dir / "lynx_full"),
            "LYNX_DEVICE": "cpu",
            "LYNX_RETRY_DELAY_SECONDS": "0",
            "LYNX_DELIVER_PRESET": "ultrafast",
        }
        env.update({f"LYNX_{name.upper()}": str(value) for name, value in overrides.items()})
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        reset_process_state()
        return env

    yield configure
    reset_process_state()


def run_lynx(*args, **kwargs):
    """The ``lynx`` flow's outcome, whether its run ended Completed or (a job failed) Failed."""
    from flows.generate import lynx
    from tasks.states import outcomes_of

    return outcomes_of(lynx(*args, return_state=True, **kwargs))


def run_campaign(*args, **kwargs):
    """The ``lynx-campaign`` flow's outcomes, whether its run ended Completed or Failed."""
    from flows.campaign import lynx_campaign
    from tasks.states import outcomes_of

    return outcomes_of(lynx_campaign(*args, return_state=True, **kwargs))
