"""Whether a decode step verifies its rows' drafts: the tokens they are expected to gain against what a verify
step costs beside a plain decode step, both measured on the target as it serves.

A verify step of R rows carries each row's last token and its drafts; it gains each row one token plus the
drafts it accepts (`NgramDrafter.expected`), where a plain decode step gains one token a row. It pays when

    expected tokens / verify seconds > R / decode seconds

with the seconds running means of the steps of that many rows (and, for a verify step, about that many
tokens) the engine has run. Measured, not assumed: a verify step costs 1.2x to 2.4x a decode step on this
CPU, depending on rows, drafts and layout (benchmarks/bench_speculative.py), and a NeuronCore's projection
differs again (benchmarks/roofline.py, section 7). Until a plain step of R rows has been timed, the step is
plain; until a verify step of its size has been, it verifies whenever a draft is expected to gain anything.
Which steps verify never changes the tokens (`row_sampling.verify`), only how fast they come.
"""

from dataclasses import dataclass, field

from minimax_m2.device.step import Step, power_bucket

RECENT = 0.25  # the weight of a step's seconds in the running mean of its kind


@dataclass
class VerifyGate:
    always: bool = False  # verify whenever there are drafts (tests and benchmarks)
    decode: dict[int, float] = field(default_factory=dict)  # rows -> seconds of a plain decode step
    verify: dict[tuple[int, int], float] = field(default_factory=dict)  # (rows, power_bucket(tokens)) -> seconds

    def opens(self, rows: int, tokens: int, real_rows: int, expected: float) -> bool:
        """Whether a step of `rows` rows (its real ones `real_rows`) verifies `tokens` tokens in all, from
        which it expects `expected` new tokens."""
        if self.always:
            return True
        plain = self.decode.get(rows)
        if plain is None:
            return False
        cost = self.verify.get((rows, power_bucket(tokens)))
        if cost is None:
            return expected > real_rows
        return expected * plain > real_rows * cost

    def measured(self, step: Step, seconds: float) -> None:
        """A decode or verify step ran in `seconds`."""
        rows, seq = step.input_ids.shape
        if seq == 1:
            key, means = rows, self.decode
        else:
            key, means = (rows, power_bucket(int(step.token_valid.sum()))), self.verify
        means[key] = seconds if key not in means else means[key] + RECENT * (seconds - means[key])
