"""Reading the small JSON files of a checkpoint or a prepared directory, with errors that name the file."""

from pathlib import Path
from typing import Any

from minimax_m2 import bounded_json


def read_json(file: Path, missing: str) -> Any:
    """The JSON in `file`; FileNotFoundError '<file> not found: <missing>', or ValueError naming the file."""
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: {missing}")
    try:
        return bounded_json.loads(file.read_bytes())
    except bounded_json.JSONInputError as err:
        raise ValueError(f"{file}: {err}") from None
