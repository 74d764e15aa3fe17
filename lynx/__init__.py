"""lynx: identity-preserving video generation pipeline (services, CLI, face and media stages)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lynx")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+local"
