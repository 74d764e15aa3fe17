"""Errors a user can act on.

Every failure that has a cause outside our code (bad input, missing weights, unreachable server)
is raised as a ``LynxError`` subclass with a one-line message. ``setting`` names the LYNX_*
variable to look at when one is to blame; the CLI prints ``message`` and exits non-zero without a
traceback, flows record it as the job's error text.
"""

from __future__ import annotations


class LynxError(Exception):
    """Base of every user-facing error. ``str(err)`` is a complete one-line explanation."""

    exit_code: int = 1

    def __init__(self, message: str, *, setting: str | None = None) -> None:
        self.message = message
        self.setting = setting
        super().__init__(message)

    def __str__(self) -> str:
        if self.setting and self.setting not in self.message:
            return f"{self.message} (setting: {self.setting})"
        return self.message


class ConfigurationError(LynxError):
    """A setting is missing or invalid, or points at something that does not exist."""

    exit_code = 2


class ServiceUnavailableError(LynxError):
    """A server we depend on (database, S3) could not be reached. Transient: worth a retry.

    ``transient=False`` marks a failure of the service that waiting will not mend (a folder we may
    not write, an S3 4xx we do not know): ``lynx.outage.ride_out`` does not repeat those."""

    exit_code = 3

    def __init__(self, message: str, *, setting: str | None = None, transient: bool = True) -> None:
        super().__init__(message, setting=setting)
        self.transient = transient


class InputError(LynxError):
    """The user's input (image, campaign file, parameters) is unusable."""

    exit_code = 4


class ModelWeightsError(ConfigurationError):
    """Model weights are missing, truncated or do not match the expected layout."""


class NotFoundError(LynxError):
    """A record or artifact that was asked for does not exist."""

    exit_code = 5


# --- foundation: run tracking and artifact store ------------------------------------------------


class IllegalTransitionError(LynxError):
    """A job was asked to move to a status its current status does not lead to."""

    exit_code = 6


class ArtifactNotFoundError(NotFoundError):
    """No object is stored under the requested key."""


class InvalidKeyError(InputError):
    """An artifact key could escape its bucket or folder, or cannot be stored."""


class ChecksumMismatchError(LynxError):
    """Bytes read back from the store do not hash to the sha256 recorded when they were written."""

    exit_code = 7


# --- pipeline ------------------------------------------------------------------------------------


class JobFailedError(LynxError):
    """A generation job ran and failed; the message names the stage and the reason."""

    exit_code = 8


class JobNeedsReviewError(LynxError):
    """A job's video was made but held for review (quality gate); its files are kept."""

    exit_code = 9


class JobRunningElsewhereError(LynxError):
    """The job is being run by another live flow run; this run did nothing for it."""

    exit_code = 10
