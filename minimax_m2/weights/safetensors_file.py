"""Reading tensors from one .safetensors file, validated, without loading the rest of the file.

float8_e4m3fn and bfloat16 are decoded to float32 exactly with NumPy alone.
"""

import os
from pathlib import Path

import ml_dtypes
import numpy as np

from minimax_m2 import bounded_json

_MAX_HEADER = 100 * 1024 * 1024


def _e4m3fn_table() -> np.ndarray:
    """float32 value of each of the 256 float8_e4m3fn bit patterns (bias 7, no infinities, S.1111.111 = NaN)."""
    bits = np.arange(256)
    sign = np.where(bits & 0x80, -1.0, 1.0)
    exponent = (bits >> 3) & 0xF
    mantissa = bits & 0x7
    normal = (1.0 + mantissa / 8.0) * np.exp2(exponent - 7.0)
    subnormal = (mantissa / 8.0) * np.exp2(-6.0)
    values = sign * np.where(exponent == 0, subnormal, normal)
    values[(exponent == 15) & (mantissa == 7)] = np.nan
    return values.astype(np.float32)


_E4M3FN = _e4m3fn_table()

# dtype name -> (stored numpy dtype, decoder to float32 or None when already numeric)
_DTYPES = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "F64": np.dtype("<f8"),
    "BF16": np.dtype("<u2"),
    "F8_E4M3": np.dtype("u1"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
}


def _to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    if dtype == "F8_E4M3":
        return _E4M3FN[raw]
    return raw.astype(np.float32)


class SafetensorsFile:
    """Header of one safetensors file; tensors are read one at a time on request."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ValueError(f"{self.path}: not a safetensors file (shorter than its 8-byte header length)")
            header_len = int.from_bytes(prefix, "little")
            if header_len > min(_MAX_HEADER, size - 8):
                raise ValueError(f"{self.path}: header length {header_len} exceeds the file "
                                 "(truncated or not safetensors)")
            try:
                header = bounded_json.loads(f.read(header_len))
            except bounded_json.JSONInputError as err:
                raise ValueError(f"{self.path}: malformed safetensors header: {err}") from None
        if not isinstance(header, dict):
            raise ValueError(f"{self.path}: malformed safetensors header: not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise ValueError(f"{self.path}: malformed safetensors header: __metadata__ must map names to strings")
        self.metadata: dict[str, str] = metadata
        self._data_start = 8 + header_len
        self._mapped: np.memmap | None = None
        self._entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {
            key: self._entry(key, entry) for key, entry in header.items()
        }
        self._check_ranges(size - self._data_start)

    def _entry(self, key: str, entry: object) -> tuple[str, tuple[int, ...], int, int]:
        """(dtype, shape, begin, end) of one header entry, every field checked by type and size."""
        def ints(value: object, count: int | None = None) -> bool:
            return isinstance(value, list) and (count is None or len(value) == count) and \
                all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in value)

        if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), str) or not ints(entry.get("shape")) \
                or not ints(entry.get("data_offsets"), 2):
            raise ValueError(f"{self.path}: malformed header entry for {key!r}: expected dtype (a string), shape and "
                             f"data_offsets (lists of non-negative integers), got {str(entry)[:120]}")
        dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        if dtype not in _DTYPES:
            raise ValueError(f"{self.path}: tensor {key!r} has unsupported dtype {dtype}")
        nbytes = int(np.prod(shape, dtype=np.int64)) * _DTYPES[dtype].itemsize
        if begin > end or end - begin != nbytes:
            raise ValueError(f"{self.path}: tensor {key!r} has offsets {begin}..{end} "
                             f"that do not fit shape {shape} {dtype}")
        return dtype, shape, begin, end

    def _check_ranges(self, data_size: int) -> None:
        """The tensors' byte ranges must tile the data section, in order, without overlaps or gaps (as the
        safetensors format requires): two tensors sharing bytes would silently alias."""
        position, previous = 0, None
        for key, (_, _, begin, end) in sorted(self._entries.items(), key=lambda item: (item[1][2], item[1][3])):
            if begin < position:
                raise ValueError(f"{self.path}: tensors {previous!r} and {key!r} overlap (bytes {begin}..{position})")
            if begin > position:
                raise ValueError(f"{self.path}: bytes {position}..{begin} of the data section belong to no tensor")
            if end > data_size:
                raise ValueError(
                    f"{self.path}: truncated: tensor {key!r} ends at byte {end} of a {data_size}-byte data section"
                )
            position, previous = end, key
        if position != data_size:
            raise ValueError(f"{self.path}: bytes {position}..{data_size} after the last tensor belong to no tensor")

    def keys(self) -> list[str]:
        """Tensor names in this file."""
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][1]

    def dtype(self, key: str) -> str:
        """safetensors dtype name, e.g. 'F32', 'BF16', 'F8_E4M3'."""
        return self._entries[key][0]

    def map(self, key: str) -> np.ndarray:
        """The tensor `key` as a read-only view of the memory-mapped file, in its stored dtype (BF16 as
        ml_dtypes.bfloat16): no copy, pages are read when touched."""
        dtype, shape, begin, end = self._entries[key]
        if self._mapped is None:
            self._mapped = np.memmap(self.path, dtype=np.uint8, mode="r")
        stored = np.dtype(ml_dtypes.bfloat16) if dtype == "BF16" else _DTYPES[dtype]
        return self._mapped[self._data_start + begin : self._data_start + end].view(stored).reshape(shape)

    def read(self, key: str) -> np.ndarray:
        """The tensor `key` decoded to float32 (exactly, for every supported float dtype)."""
        dtype, shape, begin, end = self._entries[key]
        with open(self.path, "rb") as f:
            f.seek(self._data_start + begin)
            buffer = f.read(end - begin)
        if len(buffer) != end - begin:
            raise ValueError(f"{self.path}: truncated while reading {key!r}")
        raw = np.frombuffer(buffer, dtype=_DTYPES[dtype]).reshape(shape)
        return _to_float32(raw, dtype)
