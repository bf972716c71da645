"""Markdown tables as the benchmarks print them: a header with its rule, then rows, each printed (and
flushed) as it is measured."""


def header(*columns: str) -> None:
    """Print a table's header line and its rule."""
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns), flush=True)


def row(*cells: object) -> None:
    """Print one row (each cell as str() gives it)."""
    print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)
