"""A stand-in for nkipy's compiler, to measure the warm-up where the Neuron compiler is absent.

It keeps nkipy's NEFF cache (b91c980, `DeviceKernel._trace_and_compile`): a program's NEFF is
`{build_dir}/{name}_{digest}/{name}.neff`, the digest taken over the program (here its name, argument shapes
and dtypes, constants) and the compiler arguments, and a NEFF already there is reused. A compile takes
`compile_seconds` and is counted by program name and by the thread (rank) that made it. Nothing is traced
and nothing runs: `load` gives a kernel with no inputs or outputs. `benchmarks/bench_warm_up.py` times the
real compile set with it; the runner's tests extend it with kernels that run.
"""

import hashlib
import threading
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np


class StandInCompiler:
    """`compile` and `load` as `minimax_m2.device.neuron.NkipyKernels` has them."""

    compiled: Counter = Counter()  # compiles by program name
    by_thread: Counter = Counter()  # compiles by the thread (rank) that made them
    traces = 0  # compile calls: nkipy traces the unit on each, whether or not its NEFF is there
    compile_seconds = 0.0

    @classmethod
    def compile(cls, fn: Any, *, name: str, build_dir: str, additional_compiler_args: str | None, **kwargs: Any
                ) -> str:
        """The NEFF path of this program, written (taking `compile_seconds`) unless it is there."""
        cls.traces += 1
        arrays = sorted((k, v.shape, v.dtype.str) for k, v in kwargs.items() if isinstance(v, np.ndarray))
        constants = sorted((k, v) for k, v in kwargs.items() if not isinstance(v, np.ndarray))
        program = repr((name, arrays, constants, additional_compiler_args))
        path = Path(build_dir) / f"{name}_{hashlib.sha1(program.encode()).hexdigest()[:16]}" / f"{name}.neff"
        if not path.exists():
            time.sleep(cls.compile_seconds)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(program)
            cls.compiled[name] += 1
            cls.by_thread[threading.current_thread().name] += 1
        return str(path)

    @classmethod
    def load(cls, neff_path: str, *, name: str) -> Any:
        """A kernel that declares no tensors (the warm-up only loads it)."""
        return SimpleNamespace(name=name, input_tensors_info={}, output_tensors_info={})

    @classmethod
    def reset(cls) -> None:
        cls.compiled.clear()
        cls.by_thread.clear()
        cls.traces = 0
