"""The campaign audio track: checked before any encoding starts.

A file that ffmpeg would stumble over halfway through the mux (truncated, not audio at all) is
found here by decoding it completely once; a 3-minute track decodes in well under a second.
"""

from __future__ import annotations

from pathlib import Path

import av
from pydantic import BaseModel, ConfigDict

from lynx.media.errors import AudioError

_SETTING = "LYNX_DELIVER_AUDIO"


class AudioInfo(BaseModel):
    model_config = ConfigDict(frozen=True)

    path: Path
    codec: str
    duration: float
    sample_rate: int
    channels: int


def probe_audio(path: Path) -> AudioInfo:
    """Decode the whole file; raise ``AudioError`` naming the file if it is not usable audio."""
    path = Path(path)
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise AudioError(f"audio file {path} holds no audio stream", setting=_SETTING)
            stream = container.streams.audio[0]
            samples = sum(frame.samples for frame in container.decode(stream))
            rate = stream.codec_context.sample_rate
            info = AudioInfo(
                path=path,
                codec=stream.codec_context.name,
                duration=samples / rate if rate else 0.0,
                sample_rate=rate,
                channels=stream.codec_context.channels,
            )
    except FileNotFoundError:
        raise AudioError(f"audio file {path} does not exist", setting=_SETTING) from None
    except av.FFmpegError as err:
        raise AudioError(f"audio file {path} is unreadable or corrupt: {err}", setting=_SETTING) from None
    if info.duration <= 0:
        raise AudioError(f"audio file {path} contains no samples", setting=_SETTING)
    return info
