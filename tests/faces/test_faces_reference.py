"""analyze_reference_photo: the largest-face policy, the minimum size, and rejected photos."""

from __future__ import annotations

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from lynx.assets import demo_face_path
from lynx.errors import InputError, ModelWeightsError
from lynx.faces import (
    FaceTooSmallError,
    NoFaceError,
    ReferenceFace,
    analyze_reference_photo,
    arcface_crop,
    cosine_similarity,
    load_face_analyzer,
)
from lynx.images import CorruptImageError, ImageTooLargeError, NotAnImageError


def _save(image_rgb: np.ndarray, path, **options):
    Image.fromarray(image_rgb).save(path, **options)
    return path


def test_demo_face_gives_a_complete_reference(face_settings, analyzer):
    result = analyze_reference_photo(demo_face_path(), face_settings, analyzer=analyzer)
    assert isinstance(result, ReferenceFace)
    assert len(result.faces) == 1 and result.chosen == 0
    assert result.score == result.faces[0].score > 0.9
    assert result.box.shape == (4,) and result.kps.shape == (5, 2)
    assert result.embedding.shape == (128,) and result.embedding.dtype == np.float32
    assert np.isclose(np.linalg.norm(result.embedding), 1.0, atol=1e-5)
    assert result.embedding_model == "sface_2021dec"
    assert result.arcface_crop.shape == (112, 112, 3) and result.reference_crop.shape == (256, 256, 3)
    assert result.image_size == (512, 512)
    document = result.to_dict()
    assert set(document) == {"faces", "chosen", "embedding", "embedding_model"}
    assert len(document["faces"][0]["kps"]) == 5 and len(document["faces"][0]["box"]) == 4


def test_largest_face_is_chosen(tmp_path, face_settings, analyzer, t1_rgb):
    result = analyze_reference_photo(_save(t1_rgb, tmp_path / "t1.png"), face_settings, analyzer=analyzer)
    areas = [face.area for face in result.faces]
    assert len(areas) == 6 and result.chosen == int(np.argmax(areas))
    chosen = result.faces[result.chosen]
    assert cosine_similarity(result.embedding, analyzer.embed(t1_rgb, chosen)) > 0.999


def test_largest_face_wins_over_a_smaller_second_person(
    tmp_path, face_settings, analyzer, astronaut_rgb, hanks_rgb
):
    canvas = np.zeros((512, 900, 3), np.uint8)
    canvas[:, :512] = astronaut_rgb
    canvas[100:412, 560:872] = hanks_rgb  # his face: ~78 px, the astronaut's ~90 px
    result = analyze_reference_photo(_save(canvas, tmp_path / "two.png"), face_settings, analyzer=analyzer)
    assert len(result.faces) == 2
    assert result.box[0] < 512  # the astronaut, whose face is larger


def test_exif_rotated_photo_is_turned_upright_before_detection(
    tmp_path, face_settings, analyzer, astronaut_rgb
):
    photo = _save(astronaut_rgb, tmp_path / "up.png")
    upright = analyze_reference_photo(photo, face_settings, analyzer=analyzer)
    exif = Image.Exif()
    exif[0x0112] = 8  # "rotate 90 CCW to display": stored turned clockwise
    stored = np.ascontiguousarray(np.rot90(astronaut_rgb, k=-1))
    rotated = analyze_reference_photo(
        _save(stored, tmp_path / "side.jpg", exif=exif, quality=95), face_settings, analyzer=analyzer
    )
    assert np.abs(rotated.box - upright.box).max() < 6
    assert cosine_similarity(rotated.embedding, upright.embedding) > 0.95


def test_no_face(tmp_path, face_settings, analyzer):
    landscape = np.zeros((300, 400, 3), np.uint8)
    landscape[150:] = (40, 120, 40)
    with pytest.raises(NoFaceError, match="no face found"):
        analyze_reference_photo(_save(landscape, tmp_path / "field.png"), face_settings, analyzer=analyzer)


def test_face_too_small(tmp_path, settings_for, analyzer, astronaut_rgb):
    small = cv2.resize(astronaut_rgb, (256, 256), interpolation=cv2.INTER_AREA)  # face ~45 px
    path = _save(small, tmp_path / "small.png")
    with pytest.raises(FaceTooSmallError, match="below the minimum of 64 px") as caught:
        analyze_reference_photo(path, settings_for(face_min_size=64), analyzer=analyzer)
    assert caught.value.setting == "LYNX_FACE_MIN_SIZE"
    accepted = analyze_reference_photo(path, settings_for(face_min_size=32), analyzer=analyzer)
    assert accepted.embedding.shape == (128,)


def test_bad_files_raise_their_image_errors(tmp_path, face_settings, analyzer, astronaut_rgb):
    text = tmp_path / "notes.jpg"
    text.write_text("hello")
    with pytest.raises(NotAnImageError):
        analyze_reference_photo(text, face_settings, analyzer=analyzer)
    jpeg = _save(astronaut_rgb, tmp_path / "a.jpg")
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(jpeg.read_bytes()[:5000])
    with pytest.raises(CorruptImageError):
        analyze_reference_photo(cut, face_settings, analyzer=analyzer)
    with pytest.raises(ImageTooLargeError):
        tiny_limit = face_settings.model_copy(update={"max_image_pixels": 1000})
        analyze_reference_photo(jpeg, tiny_limit, analyzer=analyzer)


def test_face_errors_are_input_errors():
    assert issubclass(NoFaceError, InputError) and issubclass(FaceTooSmallError, InputError)


def _linear_recognizer(path, size: int, dim: int = 8):
    """A real recognition ONNX taking ``size`` x ``size`` crops: one random linear map of the pixels,
    so its embedding changes with every pixel of the crop it is given."""
    weights = np.random.default_rng(size).standard_normal((3 * size * size, dim)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["data"], ["flat"], axis=1),
         helper.make_node("MatMul", ["flat", "w"], ["fc1"])],
        "linear_recognizer",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, ["N", dim])],
        [numpy_helper.from_array(weights, "w")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_crop_follows_the_recognizers_input_size(tmp_path, settings_for, analyzer):
    recognizer = _linear_recognizer(tmp_path / "linear224.onnx", 224)
    wide = load_face_analyzer(settings_for(face_recognizer=str(recognizer)))
    assert wide.embedder.input_size == 224
    result = analyze_reference_photo(demo_face_path(), settings_for(), analyzer=wide)
    assert result.arcface_crop.shape == (224, 224, 3)
    image_bgr = np.ascontiguousarray(np.asarray(Image.open(demo_face_path()).convert("RGB"))[..., ::-1])
    expected = wide.embedder.embed(arcface_crop(image_bgr, result.kps, 224))
    assert cosine_similarity(result.embedding, expected) > 0.9999
    assert result.embedding.shape == (8,)
    # the same face through FaceAnalyzer.embed, as evaluation calls it
    rgb = np.asarray(Image.open(demo_face_path()).convert("RGB"))
    assert cosine_similarity(wide.embed(rgb, result.face), expected) > 0.9999
    # the 112 crop scaled up is another picture: the template is scaled, not the crop
    standard = analyze_reference_photo(demo_face_path(), settings_for(), analyzer=analyzer)
    assert not np.array_equal(cv2.resize(standard.arcface_crop, (224, 224)), result.arcface_crop)


def test_recognizer_with_an_unalignable_input_size_is_refused_at_load(tmp_path, settings_for):
    recognizer = _linear_recognizer(tmp_path / "linear144.onnx", 144)
    with pytest.raises(ModelWeightsError) as caught:
        load_face_analyzer(settings_for(face_recognizer=str(recognizer)))
    assert caught.value.setting == "LYNX_FACE_RECOGNIZER"
    assert str(recognizer) in str(caught.value) and "144x144" in str(caught.value)
