"""Reading safetensors files safely and cheaply.

The adapters of the 14B model are 8 GiB in bf16, so nothing here reads a whole file into host RAM:
headers are parsed on their own (a few KiB) to check names, shapes and completeness before any
tensor is touched, and tensors are then streamed one at a time from the memory-mapped file straight
to their target device and dtype.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import WeightsError

# dtype names used in safetensors headers
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
# bytes read from each end of a file's data for the fingerprint
_FINGERPRINT_SAMPLE = 1 << 16


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class SafetensorsHeader:
    """The table of contents of one safetensors file, checked against the file's size."""

    path: Path
    tensors: Mapping[str, TensorInfo]
    metadata: Mapping[str, str]
    header_bytes: bytes
    data_start: int

    def shape(self, key: str) -> tuple[int, ...]:
        return self.tensors[key].shape


def read_header(path: str | Path, *, role: str | None = None) -> SafetensorsHeader:
    """Parse and validate the header of ``path`` without loading any tensor.

    Raises ``WeightsError`` naming the file when it is missing, empty, truncated or not a
    safetensors file at all.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}", path=path, role=role)
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise WeightsError(f"{path} is truncated or empty ({size} bytes)", path=path, role=role)
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > size - 8:
            raise WeightsError(
                f"{path} is truncated or not a safetensors file: header claims {header_len} bytes, "
                f"file has {size}",
                path=path,
                role=role,
            )
        header_bytes = handle.read(header_len)
    try:
        raw = json.loads(header_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WeightsError(
            f"{path} is corrupt: unreadable safetensors header ({err})", path=path, role=role
        ) from None
    if not isinstance(raw, dict):
        raise WeightsError(f"{path} is corrupt: safetensors header is not a table", path=path, role=role)

    metadata = raw.pop("__metadata__", None) or {}
    tensors: dict[str, TensorInfo] = {}
    data_end = 0
    try:
        for key, entry in raw.items():
            tensors[key] = TensorInfo(dtype=entry["dtype"], shape=tuple(int(d) for d in entry["shape"]))
            data_end = max(data_end, int(entry["data_offsets"][1]))
    except (KeyError, TypeError, ValueError, IndexError):
        raise WeightsError(
            f"{path} is corrupt: malformed entry in the safetensors header", path=path, role=role
        ) from None
    expected = 8 + header_len + data_end
    if size < expected:
        raise WeightsError(
            f"{path} is truncated: {size} bytes on disk, {expected} needed (re-download or re-copy it)",
            path=path,
            role=role,
        )
    return SafetensorsHeader(path, tensors, metadata, header_bytes, 8 + header_len)


def check_keys(
    header: SafetensorsHeader,
    expected: Mapping[str, tuple[int, ...]],
    *,
    role: str | None = None,
    what: str = "",
) -> None:
    """Require the file's tensors to be exactly ``expected`` (names and shapes)."""
    found = set(header.tensors)
    missing = sorted(set(expected) - found)
    unexpected = sorted(found - set(expected))
    label = f" ({what})" if what else ""
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys, e.g. {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys, e.g. {', '.join(unexpected[:3])}")
        raise WeightsError(
            f"{header.path} does not match the expected layout{label}: {'; '.join(parts)}",
            path=header.path,
            role=role,
        )
    for key, shape in expected.items():
        got = header.shape(key)
        if tuple(got) != tuple(shape):
            raise WeightsError(
                f"{header.path} has the wrong shape for {key}{label}: {list(got)}, expected {list(shape)}",
                path=header.path,
                role=role,
            )
    for key, info in header.tensors.items():
        if info.dtype not in _SAFETENSORS_DTYPES:
            raise WeightsError(
                f"{header.path}: unsupported dtype {info.dtype} for {key}", path=header.path, role=role
            )


def load_into(
    module: torch.nn.Module,
    header: SafetensorsHeader,
    *,
    device: torch.device | str,
    dtype: torch.dtype,
    role: str | None = None,
) -> None:
    """Stream every tensor of the (already checked) file into ``module``'s parameters.

    ``module`` may live on the meta device: each parameter is replaced by the tensor read from the
    memory-mapped file, converted to ``dtype`` on ``device``, so host RAM never holds more than one
    tensor beyond the mapping.
    """
    from accelerate.utils import set_module_tensor_to_device

    device = torch.device(device)
    try:
        with safe_open(str(header.path), framework="pt", device="cpu") as handle:
            for key in handle.keys():
                tensor = handle.get_tensor(key)
                set_module_tensor_to_device(module, key, device, value=tensor, dtype=dtype, clear_cache=False)
                del tensor
    except WeightsError:
        raise
    except Exception as err:  # safetensors raises its own error type for damaged data
        raise WeightsError(f"could not read {header.path}: {err}", path=header.path, role=role) from err


def fingerprint(paths: Iterable[str | Path]) -> str:
    """A short identifier of a set of weight files (not an integrity check).

    Hashes each file's header, size and the first and last 64 KiB of its data: cheap on 40 GiB of
    weights yet different for any two trainings, so saved conditioning can be matched to the weights
    that produced it.
    """
    digest = hashlib.sha256()
    for path in sorted(Path(p) for p in paths):
        header = read_header(path)
        size = path.stat().st_size
        digest.update(path.name.encode())
        digest.update(str(size).encode())
        digest.update(header.header_bytes)
        with path.open("rb") as handle:
            handle.seek(header.data_start)
            digest.update(handle.read(_FINGERPRINT_SAMPLE))
            handle.seek(max(header.data_start, size - _FINGERPRINT_SAMPLE))
            digest.update(handle.read(_FINGERPRINT_SAMPLE))
    return digest.hexdigest()[:16]
