"""What runs the engine's steps: the protocol, and the executor of one process."""

from typing import Protocol

from minimax_m2.device.step import Step, StepOutput
from minimax_m2.model import MiniMaxM2Model


class Executor(Protocol):
    """What runs the engine's steps: on this process (`LocalExecutor`), or on every rank
    (`minimax_m2.serving.lockstep.PlanSender`)."""

    def execute(self, step: Step) -> StepOutput: ...

    def copy(self, copies: list[tuple[int, int, int]]) -> None: ...

    def heartbeat(self) -> None: ...

    def stop(self) -> None: ...

    def stats(self) -> dict[str, float]: ...


class LocalExecutor:
    """Runs each step on this process's model (one rank, or every rank deciding alike, as `--mode generate`
    does under torchrun). `minimax_m2.serving.lockstep.PlanSender` is the multi-rank one."""

    def __init__(self, model: MiniMaxM2Model):
        self.model = model

    def execute(self, step: Step) -> StepOutput:
        return self.model.run(step)

    def copy(self, copies: list[tuple[int, int, int]]) -> None:
        self.model.copy_blocks(copies)

    def stats(self) -> dict[str, float]:
        return {}

    def heartbeat(self) -> None:
        pass

    def stop(self) -> None:
        pass
