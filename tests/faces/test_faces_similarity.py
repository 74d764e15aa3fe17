"""Face similarity over video frames, streamed."""

from __future__ import annotations

import av
import cv2
import numpy as np
import pytest

from lynx.errors import ConfigurationError, InputError
from lynx.faces.similarity import FaceSimilarity, iter_video_frames, video_face_similarity


def _frames(astronaut_rgb, hanks_rgb):
    """8 frames of 320x320: 4 astronaut (slightly moving), 2 empty, 2 Tom Hanks."""
    face = cv2.resize(astronaut_rgb, (320, 320))
    other = cv2.resize(hanks_rgb, (320, 320))
    blank = np.full((320, 320, 3), 90, np.uint8)
    moved = [np.roll(face, shift, axis=1) for shift in (0, 6, 12, 18)]
    return [*moved, blank, blank, other, other]


@pytest.fixture(scope="module")
def reference(analyzer, astronaut_rgb):
    faces = analyzer.find_faces(astronaut_rgb)
    return analyzer.embed(astronaut_rgb, faces[0])


def test_statistics_over_frames_with_a_face(analyzer, reference, astronaut_rgb, hanks_rgb):
    result = video_face_similarity(iter(_frames(astronaut_rgb, hanks_rgb)), reference, analyzer)
    assert isinstance(result, FaceSimilarity)
    assert result.frames_total == 8 and result.frames_with_face == 6
    assert result.face_share == pytest.approx(6 / 8)
    assert result.per_frame[4] is None and result.per_frame[5] is None
    assert all(value > 0.85 for value in result.per_frame[:4])
    assert all(value < 0.35 for value in result.per_frame[6:])
    present = [v for v in result.per_frame if v is not None]
    assert result.mean == pytest.approx(np.mean(present))
    assert result.std == pytest.approx(np.std(present))
    assert result.min == min(present) and result.max == max(present)
    assert set(result.to_dict()) >= {"mean", "face_share", "per_frame"}


def test_stride_and_lazy_consumption(analyzer, reference, astronaut_rgb, hanks_rgb):
    frames = _frames(astronaut_rgb, hanks_rgb)
    pulled = []

    def stream():
        for frame in frames:
            pulled.append(1)
            yield frame

    result = video_face_similarity(stream(), reference, analyzer, stride=3)
    assert result.frames_total == 3  # frames 0, 3, 6
    assert len(pulled) == 8
    assert result.per_frame[0] > 0.85 and result.per_frame[2] < 0.35


def test_video_without_faces_and_empty_video(analyzer, reference):
    blank = [np.zeros((64, 64, 3), np.uint8)] * 3
    empty = video_face_similarity(blank, reference, analyzer)
    assert (empty.mean, empty.frames_with_face, empty.face_share, empty.frames_total) == (None, 0, 0.0, 3)
    assert video_face_similarity([], reference, analyzer).frames_total == 0


def test_reference_from_another_recogniser_is_refused(analyzer):
    with pytest.raises(ConfigurationError, match="512-d"):
        video_face_similarity([], np.ones(512, np.float32), analyzer)


def test_iter_video_frames_decodes_a_real_file(tmp_path, analyzer, reference, astronaut_rgb, hanks_rgb):
    path = tmp_path / "clip.mp4"
    frames = _frames(astronaut_rgb, hanks_rgb)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 320, 320, "yuv420p"
        stream.options = {"qscale": "2"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    decoded = list(iter_video_frames(path))
    assert len(decoded) == 8 and decoded[0].shape == (320, 320, 3) and decoded[0].dtype == np.uint8
    assert len(list(iter_video_frames(path, stride=2))) == 4
    result = video_face_similarity(iter_video_frames(path), reference, analyzer)
    assert result.frames_with_face == 6 and result.mean is not None


def test_iter_video_frames_rejects_non_videos(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        list(iter_video_frames(tmp_path / "none.mp4"))
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all" * 10)
    with pytest.raises(InputError):
        list(iter_video_frames(junk))
