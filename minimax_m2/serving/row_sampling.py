"""How each row's next token is chosen: the settings, random draws and grammar masks a step carries, and the
token (with its log-probabilities) taken from what the step brings back.

The device samples a row whose temperature is 0 (greedy) or whose top_k the candidates cover; any other
row is drawn here from its logits with the same draw. A decode step carries the grammar masks of its
constrained rows (computed on the grammar engine's thread while the step's layers run); a prefill's
constrained row brings its logits back and is masked here by the kernel the device runs.
"""

import numpy as np

from kernels.token_mask import mask_logits
from minimax_m2.device.program import CANDIDATES
from minimax_m2.device.step import Sampled, Step, StepOutput, mask_bucket
from minimax_m2.generation import Sampling
from minimax_m2.sampling import TokenLogprobs, draw, sampling_probs, token_logprobs
from minimax_m2.serving.request import Request

FORBIDDEN = -1e29  # log-probabilities below this are of tokens a grammar forbids (`kernels.token_mask.FORBIDDEN`)


def on_host(sampling: Sampling) -> bool:
    """A request the device does not sample: temperature > 0 without a top_k the candidates cover."""
    return sampling.temperature > 0 and not (sampling.top_k and sampling.top_k <= CANDIDATES)


def attach(step: Step, rows: list[Request | None], keeps: list[bool],
           drafts: list[list[int]] | None = None) -> list[list[float] | None]:
    """Attach each row's sampling settings and random draws to the step (from the request's own generator, one
    draw per new token, so that a seed gives the same tokens whatever the batch, and with drafts or without)
    and, for a decode, the grammar masks of its constrained rows; ask for the logits when a row keeps them, is
    sampled on the host or is a prefill's constrained row, and else the log-probabilities when a row wants
    them (with logits at hand, they are computed from the logits). rows: the request each row samples for
    (None: nothing); drafts (a verify step): each row's drafts, whose row gets a draw for each of its
    positions, the draws of the tokens it would take one after another, only looked at (`take_draws` takes
    those of the tokens it did take). Returns each row's draws."""
    n = len(rows)
    sampled = Sampled.greedy(n)
    positions = step.selected.shape[1] if drafts is not None else 1
    uniform = np.zeros((n, positions), np.float32)
    draws: list[list[float] | None] = [None] * n
    for row, request in enumerate(rows):
        if request is None or request.sampling.temperature == 0:
            continue
        s = request.sampling
        if drafts is not None and drafts[row]:
            draws[row] = _peek(request.rng, len(drafts[row]) + 1)
        else:
            draws[row] = [float(request.rng.random())]
        uniform[row, : len(draws[row])] = draws[row]
        sampled.temperature[row] = s.temperature
        sampled.top_k[row] = 0 if on_host(s) else s.top_k
        sampled.top_p[row] = 1.0 if s.top_p is None else s.top_p
    sampled.uniform = uniform if drafts is not None else uniform[:, 0]
    step.sampled = sampled
    constrained = [(row, r.constraint) for row, r in enumerate(rows) if r is not None and r.constraint]
    prefill = step.input_ids.shape[1] > 1
    if constrained and not prefill:
        step.mask_index = np.full(n, -1, np.int32)
        step.mask_index[[row for row, _ in constrained]] = np.arange(len(constrained), dtype=np.int32)
        grammars = constrained[0][1].grammars
        step.masks = grammars.masks([c for _, c in constrained], mask_bucket(len(constrained), n))
    step.return_logits = any(keeps) or any(r is not None and on_host(r.sampling) for r in rows) \
        or bool(constrained and prefill)
    step.logprobs = not step.return_logits and any(r is not None and r.sampling.logprobs is not None for r in rows)
    return draws


def _scored(s: Sampling, out: StepOutput, row: int, k: int, logits: np.ndarray | None,
            token: int) -> TokenLogprobs | None:
    """The token's log-probabilities when its request asks for them: the device's, or computed from the logits;
    the alternatives a grammar forbids left out."""
    if s.logprobs is None:
        return None
    logprob, top = out.scored(row, k, s.logprobs) or token_logprobs(logits, token, s.logprobs)
    return logprob, [(i, v) for i, v in top if v > FORBIDDEN]


def next_token(request: Request, out: StepOutput, row: int, k: int, uniform: float | None,
               host_mask: bool = False) -> tuple[int, TokenLogprobs | None]:
    """The request's next token (the step's row `row`, its k-th selected token) and its log-probabilities when
    asked for: the device's, or drawn here from its logits when the device leaves it to the host (with the
    same draw), or when its grammar's mask is applied here (`host_mask`: a prefill's first token)."""
    s = request.sampling
    logits = None if out.logits is None else out.logits[row, k]
    token = out.ids[row, k]
    if host_mask:
        mask = request.constraint.grammars.masks([request.constraint], 1).result()
        logits = mask_logits(logits[None], mask, np.zeros(1, np.int32))[0]
        token = np.argmax(logits)
    if on_host(s) or host_mask and s.temperature > 0:
        token = draw(sampling_probs(logits, s.temperature, s.top_k, s.top_p), uniform)
    token = int(token)
    return token, _scored(s, out, row, k, logits, token)


def verify(request: Request, out: StepOutput, row: int, draft: list[int], draws: list[float] | None) -> list[
        tuple[int, TokenLogprobs | None]]:
    """The new tokens of a verify step's row (its token at each position selected, with that position's draw):
    the token plain decoding takes at each position, as long as it is the draft's, and one token more. The
    token at a position is chosen as a decode step chooses it, with the draw plain decoding would use there,
    so that a greedy row or a sampled one takes exactly the tokens plain decoding takes (for a sampled row,
    draft token x is accepted with probability p(x) and otherwise the token is drawn from p without x: the
    standard rule for a deterministic draft, with the draws shared). A row without drafts takes its token
    as a decode step would."""
    if not draft:
        return [next_token(request, out, row, 0, draws and draws[0], host_mask=request.constraint is not None)]
    taken = []
    for k in range(len(draft) + 1):
        taken.append(next_token(request, out, row, k, draws and draws[k]))
        if k == len(draft) or taken[-1][0] != draft[k]:
            break
    return taken


def take_draws(request: Request, draws: list[float] | None, tokens: int) -> None:
    """A verify step's row took `tokens` tokens: its generator moves past their draws, which `attach` only
    looked at (a row without drafts took its one draw then)."""
    if draws is not None and len(draws) > 1:
        request.rng.random(tokens)


def _peek(rng: np.random.Generator, count: int) -> list[float]:
    """The generator's next `count` draws, leaving it where it was."""
    state = rng.bit_generator.state
    draws = rng.random(count).tolist()
    rng.bit_generator.state = state
    return draws
