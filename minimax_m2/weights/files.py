"""Reading the small JSON files of a checkpoint or a prepared directory, with errors that name the file."""

import json
from pathlib import Path
from typing import Any


def read_json(file: Path, missing: str) -> Any:
    """The JSON in `file`; FileNotFoundError '<file> not found: <missing>', or ValueError naming the file."""
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: {missing}")
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON: {err}") from err
