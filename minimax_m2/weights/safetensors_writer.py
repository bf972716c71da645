"""Writing a safetensors file tensor by tensor, in any order, without holding the others in memory.

The header (names, dtypes, shapes, offsets) is known before any data: it is written first, the file is
sized, and each tensor's bytes go to their offset as soon as they exist.
"""

import json
from pathlib import Path

import ml_dtypes
import numpy as np

# uint8 arrays are FP8 codes (float8_e4m3fn bit patterns): stored as what they are, read back as uint8
_NAMES = {np.dtype(np.float32): "F32", np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.uint8): "F8_E4M3"}


class SafetensorsWriter:
    """A safetensors file of known tensors: `write(key, array)` fills each, in any order."""

    def __init__(self, path: str | Path, tensors: dict[str, tuple[np.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        header: dict = {"__metadata__": metadata or {}}
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int]] = {}
        offset = 0
        for key, (dtype, shape) in tensors.items():
            dtype = np.dtype(dtype)
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            header[key] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._entries[key] = (dtype, tuple(shape), offset)
            offset += nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self._data_start = 8 + len(encoded)
        self.data_bytes = offset
        self.nbytes = self._data_start + offset
        self._file = open(self.path, "wb")
        try:
            self._io(lambda: (self._file.write(len(encoded).to_bytes(8, "little") + encoded),
                              self._file.truncate(self.nbytes)))
        except OSError:
            self.discard()
            raise
        self._written: set[str] = set()
        self._parts: dict[str, set[int]] = {}

    def write(self, key: str, array: np.ndarray, index: int | None = None) -> None:
        """Tensor `key`, or with `index` its index-th entry along the first axis (the whole tensor is
        counted as written once every entry has been)."""
        dtype, shape, offset = self._entries[key]
        part = shape if index is None else shape[1:]
        if array.dtype != dtype or array.shape != part:
            raise ValueError(f"{self.path.name}: {key!r} is {array.dtype} {array.shape}, expected {dtype} {part}")
        if index is not None:
            offset += index * array.nbytes
        self._file.seek(self._data_start + offset)
        self._io(lambda: self._file.write(np.ascontiguousarray(array).tobytes()))
        if index is None:
            self._written.add(key)
        else:
            self._parts.setdefault(key, set()).add(index)
            if len(self._parts[key]) == shape[0]:
                self._written.add(key)

    def _io(self, write) -> None:
        try:
            write()
        except OSError as err:
            raise OSError(err.errno, f"writing {self.path}: {err.strerror}") from err

    def close(self) -> None:
        """Flush and close; every tensor must have been written."""
        missing = sorted(set(self._entries) - self._written)
        self._io(self._file.close)
        if missing:
            raise ValueError(f"{self.path.name}: tensors never written: {missing[:5]}")

    def discard(self) -> None:
        """Close (errors ignored) and remove the file: a run that failed leaves nothing behind."""
        try:
            self._file.close()
        except OSError:
            pass
        self.path.unlink(missing_ok=True)
