"""Running an engine step's plan and delivering what it brings back: each prefilled chunk's cache written and
its first token taken, each decode row's next token, each verify row's accepted drafts and one token more,
every token told to its request's client, and a request ended where it ends (EOS, a stop, a grammar done
or refused, `max_new_tokens`, the context's end). The engine (`minimax_m2.serving.engine`) takes requests
in and hands its scheduler's plans here; how a row's next token is chosen is `row_sampling`'s."""

import time

import numpy as np

from minimax_m2.device.step import Step, StepOutput
from minimax_m2.sampling import TokenLogprobs
from minimax_m2.serving import row_sampling
from minimax_m2.serving.blocks import BlockManager
from minimax_m2.serving.executor import Executor
from minimax_m2.serving.request import Request
from minimax_m2.serving.scheduler import Chunk, Plan, Scheduler


class StepRunner:
    def __init__(self, scheduler: Scheduler, cache: BlockManager, executor: Executor, max_seq_len: int):
        self.scheduler, self.cache, self.executor, self.max_seq_len = scheduler, cache, executor, max_seq_len
        self._last_ids: np.ndarray | None = None  # the last decode step's next ids, as the device holds them
        self.stats = {"steps": 0, "prefill_steps": 0, "decode_steps": 0, "generated_tokens": 0, "prompt_tokens": 0,
                      "reused_tokens": 0, "finished": 0, "step_seconds": 0.0, "prefill_seconds": 0.0,
                      "decode_seconds": 0.0, "verify_steps": 0, "drafted_tokens": 0, "accepted_tokens": 0,
                      "verified_rows": 0}

    def run(self, plan: Plan) -> None:
        """Run the plan: its block copies, its prefill step and its decode (or verify) step."""
        start = time.perf_counter()
        if plan.copies:
            self.executor.copy([(p.group, *p.copy) for p in plan.copies])
        if plan.prefill:
            step, chunks = plan.prefill
            draws = row_sampling.attach(step, [c.request if c and c.samples else None for c in chunks],
                                   [c is not None and c.request.keep_logits for c in chunks])
            out = self._execute(step, "prefill")
            for row, chunk in enumerate(chunks):
                if chunk is not None:
                    self._prefilled(chunk, step, row, out, draws[row])
        if plan.decode and plan.drafts is not None:
            self._verify(*plan.decode, plan.drafts)
        elif plan.decode:
            step, rows = plan.decode
            draws = row_sampling.attach(step, rows, [r is not None and r.keep_logits for r in rows])
            if self._last_ids is not None and self._last_ids.shape == step.input_ids.shape:
                padding = np.array([r is None for r in rows])
                step.input_ids[padding] = self._last_ids[padding]  # any id will do: these are the device's own
            out = self._execute(step, "decode")
            self._last_ids = out.ids.astype(np.int32)
            for row, request in enumerate(rows):
                if request is not None and request.finish_reason is None:
                    self.cache.written(request.group, request.blocks, request.length - 1, [request.generated[-1]],
                                       request.striped)
                    request.prefilled += 1
                    if request.keep_logits:
                        request.logits.append(out.logits[row, :1])
                        request.kept += 1
                    self._sampled(request, out, row, 0, draws[row])
        self.stats["steps"] += 1
        self.stats["step_seconds"] += time.perf_counter() - start

    def _execute(self, step: Step, phase: str) -> StepOutput:
        """Run one prefill or decode step, counting it and its seconds under its phase."""
        start = time.perf_counter()
        out = self.executor.execute(step)
        seconds = time.perf_counter() - start
        self.stats[f"{phase}_steps"] += 1
        self.stats[f"{phase}_seconds"] += seconds
        if phase == "decode":
            self.scheduler.gate.measured(step, seconds)
        return out

    def _prefilled(self, chunk: Chunk, step: Step, row: int, out: StepOutput, draws: list[float] | None) -> None:
        request = chunk.request
        if request.finish_reason is not None:
            return
        count = len(chunk.tokens)
        request.prefilled += count
        self.cache.written(request.group, request.blocks, chunk.start, chunk.tokens, request.striped)
        self.stats["prompt_tokens"] += count
        last = count - 1 if step.selected.shape[1] > 1 else 0  # all positions were kept, or just the last
        if request.keep_logits:  # positions a preempted request kept before are not kept again
            request.logits.append(out.logits[row, max(0, request.kept - chunk.start) : count])
            request.kept = max(request.kept, chunk.start + count)
        if chunk.samples:
            self.stats["reused_tokens"] += request.reused
            self._sampled(request, out, row, last, draws, host_mask=request.constraint is not None)

    def _verify(self, step: Step, rows: list[Request | None], drafts: list[list[int]]) -> None:
        """A verify step: each row's last token and drafts in one step; the longest accepted prefix of its
        drafts and one token more are its new tokens (`row_sampling.verify`), the rest of what it wrote is
        never read (its positions are written again when reached) nor cached."""
        # the logits of a row wanting log-probabilities (a verify step's lm_head returns ids, or ids and logits:
        # two programs); every other row's tokens are chosen on the device, with a draw for each position
        draws = row_sampling.attach(step, rows, [r is not None and r.sampling.logprobs is not None for r in rows],
                                    drafts)
        out = self._execute(step, "decode")
        self._last_ids = None
        self.stats["verify_steps"] += 1
        for row, (request, draft) in enumerate(zip(rows, drafts)):
            if request is None or request.finish_reason is not None:
                continue
            taken = row_sampling.verify(request, out, row, draft, draws[row])
            row_sampling.take_draws(request, draws[row], len(taken))
            fed = [request.generated[-1]] + draft[: len(taken) - 1]  # the accepted drafts' keys and values are right
            self.cache.written(request.group, request.blocks, request.length - 1, fed, request.striped)
            request.prefilled += len(fed)
            if draft:
                self.stats["drafted_tokens"] += len(draft)
                self.stats["accepted_tokens"] += len(taken) - 1
                self.stats["verified_rows"] += 1
                request.drafter.scored(len(taken) - 1)
            for token, scored in taken:
                self._take(request, token, scored)
                if request.finish_reason is not None:
                    break

    def _sampled(self, request: Request, out: StepOutput, row: int, k: int, draws: list[float] | None,
                 host_mask: bool = False) -> None:
        """Take the request's next token (`row_sampling.next_token`, with its one draw)."""
        self._take(request, *row_sampling.next_token(request, out, row, k, draws and draws[0], host_mask))

    def _take(self, request: Request, token: int, scored: TokenLogprobs | None) -> None:
        """A new token of the request: tell its client, and end the request where it ends."""
        s = request.sampling
        request.generated.append(token)
        if request.drafter is not None:
            request.drafter.followed(token)
        self.stats["generated_tokens"] += 1
        if scored is not None:
            request.logprobs.append(scored)
            request.notify("logprobs", scored)
        request.notify("token", token)
        held = request.constraint
        if held is not None and not held.advance(token):
            self.end(request, "length")  # the grammar refused it: the reply cannot be completed
        elif token in s.eos_token_ids or held is not None and held.complete:
            self.end(request, "stop")
        elif len(request.generated) >= s.max_new_tokens or request.length >= self.max_seq_len:
            self.end(request, "length")

    def end(self, request: Request, reason: str) -> None:
        """End the request (its reason told to its client) and free its blocks, unless it ended already."""
        if request.finish_reason is not None:
            return
        request.finish_reason = reason
        self.scheduler.finish(request)
        self.stats["finished"] += 1
        request.notify("finish", reason)
