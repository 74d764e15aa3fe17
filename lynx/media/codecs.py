"""The video formats a campaign can get: the H.264 master and the optional renditions.

One small record per format says which ffmpeg encoder makes it, how PyAV names it when probing,
what it is called on disk and which audio codec its container can carry (WebM cannot hold AAC).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

X264_PRESETS = (
    "ultrafast",
    "superfast",
    "veryfast",
    "faster",
    "fast",
    "medium",
    "slow",
    "slower",
    "veryslow",
    "placebo",
)
# libvpx has no presets: --cpu-used trades speed for quality the same way (0 slowest, 5 fastest in
# "good" mode), so the x264 preset name picks the nearest step.
_VP9_CPU_USED = {
    "ultrafast": 5,
    "superfast": 5,
    "veryfast": 4,
    "faster": 4,
    "fast": 3,
    "medium": 2,
    "slow": 1,
    "slower": 1,
    "veryslow": 0,
    "placebo": 0,
}


@dataclass(frozen=True)
class VideoFormat:
    name: str
    encoder: str
    codec: str  # as PyAV reports it when probing
    extension: str
    content_type: str
    audio_encoder: str
    audio_codec: str
    mp4: bool

    def filename(self, stem: str) -> str:
        return f"{stem}.{self.extension}"

    def encoder_options(self, *, crf: int, preset: str) -> dict[str, Any]:
        """ffmpeg output options for this encoder (ffmpeg-python keyword form)."""
        if self.encoder == "libx264":
            options: dict[str, Any] = {"crf": crf, "preset": preset, "profile:v": "high", "tag:v": "avc1"}
        elif self.encoder == "libx265":
            options = {"crf": crf, "preset": preset, "tag:v": "hvc1", "x265-params": "log-level=error"}
        else:  # libvpx-vp9 in constant-quality mode
            options = {
                "crf": crf,
                "b:v": 0,
                "row-mt": 1,
                "deadline": "good",
                "cpu-used": _VP9_CPU_USED[preset],
            }
        if self.mp4:
            # faststart: moov before mdat so players start before the download ends;
            # use_metadata_tags: keep our own keys (job_id, seed, ...) in the container.
            options["movflags"] = "+faststart+use_metadata_tags"
        return options


H264 = VideoFormat("h264", "libx264", "h264", "mp4", "video/mp4", "aac", "aac", mp4=True)
RENDITIONS: dict[str, VideoFormat] = {
    "h265": VideoFormat("h265", "libx265", "hevc", "mp4", "video/mp4", "aac", "aac", mp4=True),
    "vp9": VideoFormat("vp9", "libvpx-vp9", "vp9", "webm", "video/webm", "libopus", "opus", mp4=False),
}
