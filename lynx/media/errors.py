"""Errors of the delivery stage.

Each one is a ``LynxError`` (one line, optional ``setting=``) and also a ``DeliveryError`` so a flow
can tell "the deliverables failed" from every other failure with one ``except``. Where an error is
also a configuration or input problem it inherits that class too, so the CLI exit codes stay right.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lynx.errors import ConfigurationError, InputError, LynxError

if TYPE_CHECKING:
    from lynx.media.safety import SafetyVerdict


class DeliveryError(LynxError):
    """Building, verifying or publishing the deliverables failed; nothing was published."""


class InvalidDeliverySpecError(DeliveryError, ConfigurationError):
    """A delivery setting is out of range or contradicts another one."""


class DeliveryInputError(DeliveryError, InputError):
    """The frames (or face scores) handed to the delivery stage are unusable."""


class AudioError(DeliveryError, InputError):
    """The campaign audio file cannot be read or holds no audio."""


class EncodingError(DeliveryError):
    """ffmpeg failed; the message carries the last line it printed."""


class VerificationError(DeliveryError):
    """An output does not match what was asked for (codec, size, frames, duration, audio...)."""


class SafetyBlockedError(DeliveryError):
    """The content-safety classifier scored the video above the threshold."""

    def __init__(self, message: str, *, verdict: SafetyVerdict, setting: str | None = None) -> None:
        super().__init__(message, setting=setting)
        self.verdict = verdict


class PublishError(DeliveryError):
    """Uploading the deliverables failed or the store holds other bytes than were verified."""
