"""The benchmark protocol: sample subjects from bundled photos, prompts, the campaign file."""

from __future__ import annotations

import pytest

from lynx.campaign import load_campaign
from lynx.errors import InputError
from lynx.evaluation.bench import (
    BENCH_PROMPTS,
    PAPER_PROMPTS,
    SAMPLE_CONSENT,
    default_campaign_name,
    folder_photos,
    read_prompts,
    sample_photos,
    write_campaign_file,
)
from lynx.faces import analyze_reference_photo, load_face_analyzer


def test_bundled_sample_gives_eight_distinct_usable_subjects(eval_settings, tmp_path):
    settings = eval_settings()
    analyzer = load_face_analyzer(settings)
    photos = sample_photos(tmp_path / "photos", 8, analyzer)
    assert [p.name for p in photos] == [f"subject-{i:02d}.jpg" for i in range(1, 9)]
    references = [analyze_reference_photo(photo, settings, analyzer=analyzer) for photo in photos]
    # every photo passes the face stage's policy, and they are eight different people
    embeddings = [reference.embedding for reference in references]
    for i, first in enumerate(embeddings):
        for second in embeddings[i + 1 :]:
            assert float(first @ second) < 0.5
    with pytest.raises(InputError, match="has 8 subjects, not 9; pass a folder of photos"):
        sample_photos(tmp_path / "more", 9, analyzer)


def test_prompts_and_photo_folders(tmp_path):
    assert len(BENCH_PROMPTS) == PAPER_PROMPTS == len(set(BENCH_PROMPTS))
    listed = tmp_path / "prompts.txt"
    listed.write_text("# the protocol's prompts\na person waving\n\n  a person running  \n", encoding="utf-8")
    assert read_prompts(listed) == ["a person waving", "a person running"]
    with pytest.raises(InputError, match="cannot read prompts file"):
        read_prompts(tmp_path / "absent.txt")

    folder = tmp_path / "faces"
    folder.mkdir()
    for name in ("b.jpg", "a.png", "notes.txt", "c.JPEG"):
        (folder / name).write_bytes(b"x")
    assert [p.name for p in folder_photos(folder, 3)] == ["a.png", "b.jpg", "c.JPEG"]
    with pytest.raises(InputError, match="holds 3 photos; the protocol needs 40 subjects"):
        folder_photos(folder, 40)


def test_campaign_file_is_a_valid_campaign(tmp_path):
    photos = []
    for name in ("anna smith.jpg", "ben.jpg"):
        photos.append(tmp_path / name)
        photos[-1].write_bytes(b"x")
    path = write_campaign_file(
        tmp_path / "bench" / "campaign.yaml",
        name="bench-small-2x2-demo",
        photos=photos,
        prompts=BENCH_PROMPTS[:2],
        settings={"frames": 5, "steps": 2, "seed": 42},
        consent_reference=SAMPLE_CONSENT,
    )
    spec = load_campaign(path)
    assert spec.name == "bench-small-2x2-demo"
    assert [s.id for s in spec.subjects] == ["bench-small-2x2-demo-anna-smith", "bench-small-2x2-demo-ben"]
    assert [p.text for p in spec.prompts] == BENCH_PROMPTS[:2]
    assert (spec.settings.frames, spec.settings.steps, spec.settings.seed) == (5, 2, 42)
    assert len(spec.requests()) == 4


def test_default_campaign_name_is_one_per_protocol(tmp_path):
    photos = [tmp_path / "a.jpg", tmp_path / "b.jpg"]
    for photo in photos:
        photo.write_bytes(photo.name.encode())
    protocol = dict(
        protocol="small",
        model="demo",
        subjects=2,
        photos=None,
        prompts=BENCH_PROMPTS[:2],
        generation={"frames": 17, "height": 128, "width": 128, "steps": 8, "seed": 42},
    )
    name = default_campaign_name(**protocol)
    assert name.startswith("bench-small-2x2-demo-") and len(name) == len("bench-small-2x2-demo-") + 8
    assert default_campaign_name(**{**protocol, "prompts": list(BENCH_PROMPTS[:2])}) == name

    generation = protocol["generation"]
    variants = [
        {"generation": {**generation, "seed": 7}},
        {"generation": {**generation, "frames": 33}},
        {"generation": {**generation, "height": 256}},
        {"generation": {**generation, "steps": 4}},
        {"prompts": [BENCH_PROMPTS[0], BENCH_PROMPTS[5]]},
        {"photos": photos},
        {"model": "configured", "model_identity": {"base": "/models/wan", "adapter": "/models/lynx_full"}},
    ]
    names = [default_campaign_name(**{**protocol, **change}) for change in variants]
    assert len({name, *names}) == len(variants) + 1
    # the photos count by their bytes, not their names
    photos[1].write_bytes(b"another person")
    assert default_campaign_name(**{**protocol, "photos": photos}) != names[5]
