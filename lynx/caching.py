"""A per-process cache for loaded models: face models, evaluation recognisers, upscalers.

Loading a model costs far more than running it on one photo or video, and a worker runs many jobs.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Hashable
from typing import TypeVar

Config = TypeVar("Config")
Loaded = TypeVar("Loaded")


def cached_per_configuration(
    key: Callable[[Config], Hashable],
) -> Callable[[Callable[[Config], Loaded]], Callable[[Config], Loaded]]:
    """Decorate a model loader so that each process loads once per configuration (``key(config)``)."""

    def decorate(load: Callable[[Config], Loaded]) -> Callable[[Config], Loaded]:
        lock = threading.Lock()
        loaded: dict[Hashable, Loaded] = {}

        @functools.wraps(load)
        def cached(config: Config) -> Loaded:
            wanted = key(config)
            with lock:  # flows run tasks in threads; two loads of the same models waste minutes
                if wanted not in loaded:
                    loaded[wanted] = load(config)
                return loaded[wanted]

        return cached

    return decorate
