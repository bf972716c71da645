"""The serving engine: continuous batching over a paged KV cache, behind the server, the CLI and the Python API.

Requests are admitted FIFO while their attention group has a free row and blocks (reusing any cached
prefix), prefilled in chunks and decoded together, each row at its own position through its own block
table with its own sampling settings, and their blocks released the step they end (EOS, `max_new_tokens`,
the context's end, a grammar completed, or a cancel); when decoding needs blocks the pool lacks, the most
recently admitted request gives its own back and waits again. A request may be held to a grammar
(`minimax_m2.serving.constraint`); with `speculative`, a decoding request's n-gram drafts are verified in
its decode step (`minimax_m2.serving.drafts`) where that pays (`minimax_m2.serving.verify_gate`).
Each step's shapes come from the engine's `ShapeSet`; the scheduler's plan of each step is run, and what it
brings back delivered to the requests, by `minimax_m2.serving.step_runner` through the executor (the model
here; over several ranks, a plan sent to all of them first). The engine runs either on its own thread
(`start`: the server) or inline (`generate`).

    engine = Engine(model, max_num_seqs=8, prefill_chunk=256)
    results = engine.generate([[1, 2, 3], [4, 5]], Sampling(max_new_tokens=16), on_token=print)
"""

import numbers
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from minimax_m2.device.program import Unit
from minimax_m2.device.step import (
    KV_BLOCK,
    Step,
    blocks_for,
    table_width,
)
from minimax_m2.generation import Sampling
from minimax_m2.model import MiniMaxM2Model
from minimax_m2.sampling import TokenLogprobs
from minimax_m2.serving.blocks import BlockManager
from minimax_m2.serving.drafts import NgramDrafter, SharedAnswers
from minimax_m2.serving.executor import Executor, LocalExecutor
from minimax_m2.serving.request import Notify, Request
from minimax_m2.serving.scheduler import Scheduler
from minimax_m2.serving.shapes import ShapeSet
from minimax_m2.serving.step_runner import StepRunner
from minimax_m2.serving.verify_gate import VerifyGate

if TYPE_CHECKING:
    from minimax_m2.serving.constraint import Constraint

MIN_COPY = 32  # prompt tokens a copied cache block must save to be worth copying
IDLE_SECONDS = 2.0  # an idle engine's heartbeat to the other ranks
MAX_SPECULATIVE = 16  # draft tokens a row may have verified per step, at most
# with several attention groups, contexts from this many tokens are spread over all of them: a 16k prompt's
# prefill is one step rather than 8 chunks (benchmarks/roofline.py, section 5), at a TPOT within ~0.5 ms of
# reading its 128 tiles in one group
SPREAD_FROM = 16_384


@dataclass
class Result:
    prompt: list[int]
    generated: list[int]
    finish_reason: str
    reused: int  # prompt tokens found in the cache
    logits: np.ndarray | None  # [prompt + generated - 1, vocab] with keep_logits
    logprobs: list[TokenLogprobs]  # per new token, when its sampling asks for them


class Engine:
    def __init__(self, model: MiniMaxM2Model, max_num_seqs: int = 8, prefill_chunk: int = 256,
                 executor: Executor | None = None, prefix_reuse: bool = True, keep_logits: bool = True,
                 kv_blocks: int | None = None, speculative: int = 0, verify_gate: VerifyGate | None = None,
                 spread_from: int = SPREAD_FROM):
        """max_num_seqs: requests decoded together per attention group; prefill_chunk: prompt tokens per step;
        kv_blocks: the KV pool's blocks of KV_BLOCK positions per attention group (default: max_num_seqs
        whole contexts);
        prefix_reuse: find prompts' prefixes in the cache (off: every prompt is prefilled cold); keep_logits:
        requests may keep the logits of every position (off: the lm_head variants returning a prefill's
        [tokens, vocab] logits are neither compiled nor planned for); speculative: draft tokens a decoding
        request may have verified per step (n-gram drafts from its own tokens and from other requests' answers,
        ended or still running, `minimax_m2.serving.drafts`; 0: none); verify_gate:
        whether a decode step verifies its drafts (default: where the measured costs say it pays); spread_from:
        with several attention groups, a request whose context reaches this many tokens has its cache striped
        over all of them, each prefill step taking one chunk a group and every group attending every step's
        queries against its blocks (context parallelism; 0: never)."""
        if max_num_seqs < 1 or prefill_chunk < 1:
            raise ValueError(f"max_num_seqs and prefill_chunk must be positive, got {max_num_seqs}, {prefill_chunk}")
        if spread_from < 0:
            raise ValueError(f"spread_from must be 0 (never) or positive, got {spread_from}")
        if not 0 <= speculative <= MAX_SPECULATIVE:
            raise ValueError(f"speculative tokens must lie in 0..{MAX_SPECULATIVE}, got {speculative}")
        self.speculative = speculative
        self.answers = SharedAnswers() if speculative else None  # requests' answers, drafts for every request
        self.model = model
        self.keep_logits = keep_logits
        self.groups = model.layout.dp
        self.shapes = ShapeSet.build(self.groups, max_num_seqs, min(prefill_chunk, model.max_seq_len),
                                     model.max_seq_len, rows_size_experts=model.layout.moe_tp < model.layout.world,
                                     speculative=speculative, compiled=not model.on_cpu, spread_from=spread_from)
        previous = model.owner
        if previous is not None and (not previous.idle() or previous.running()):
            raise RuntimeError("this model already serves an engine with requests in flight or a thread running: "
                               "stop it first (one engine per model)")
        blocks = kv_blocks or max_num_seqs * blocks_for(model.max_seq_len)
        if blocks < 1:
            raise ValueError(f"kv_blocks must be positive, got {kv_blocks}")
        model.allocate(blocks)
        model.owner = self
        self.max_num_seqs = max_num_seqs
        self.cache = BlockManager(self.groups, blocks, MIN_COPY, prefix_reuse)
        self.scheduler = Scheduler(self.cache, self.shapes, self.groups, max_num_seqs, table_width(model.max_seq_len),
                                   verify_gate)
        self.executor = executor or LocalExecutor(model)
        self.runner = StepRunner(self.scheduler, self.cache, self.executor, model.max_seq_len)
        self.stats = self.runner.stats
        self.failure: str | None = None  # why the engine's thread stopped, if it failed
        self.on_failure: Callable[[str], None] = lambda message: None
        self._inbox: list[Request] = []
        self._cancelled: list[Request] = []
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    def warm_up(self, every_shape: bool) -> int:
        """Before serving: choose the expert schedules (measuring this CPU's costs) and, with every_shape,
        run each step shape of the set on padding, once for each lm_head variant (greedy or sampling on the
        device, with or without logits), compiling and first-touching all of them on a device; returns the
        steps run."""
        self.model.schedule_cost()
        if not every_shape:
            return 0
        steps = self._warm_up_steps()
        for step in steps:
            self.executor.execute(step)
        if self.cache.reuse:
            self.executor.copy([(0, self.model.blocks, self.model.blocks)])
        return len(steps)

    def programs(self) -> dict[tuple, Unit]:
        """Every distinct program the warm-up compiles (each step shape with each lm_head variant, and the
        prefix copy), by `Unit.key`."""
        units = [unit for step in self._warm_up_steps() for unit in self.model.programs(step)]
        if self.cache.reuse:
            units.append(self.model.copy_program())
        return {unit.key(): unit for unit in units}

    def _warm_up_steps(self) -> list[Step]:
        """A padding step of each shape of the set with each lm_head variant (`ShapeSet.padding_steps`)."""
        return self.shapes.padding_steps(self.model.blocks, table_width(self.model.max_seq_len), self.keep_logits,
                                         self.model.config.vocab_size)

    # --- requests ------------------------------------------------------------------------------------------
    def check(self, prompt_len: int, max_new_tokens: int) -> None:
        """Refuse, before queueing, a request whose prompt and new tokens cannot fit the context."""
        if prompt_len < 1:
            raise ValueError("the prompt is empty")
        if prompt_len + max_new_tokens - 1 > self.model.max_seq_len:
            raise ValueError(f"the prompt's {prompt_len} tokens + {max_new_tokens} new tokens exceed the context of "
                             f"{self.model.max_seq_len} tokens")
        needed = blocks_for(prompt_len + max_new_tokens - 1)
        if self.shapes.spread_from and prompt_len >= self.shapes.spread_from:
            needed = -(-needed // self.groups)  # striped over the groups
        if needed > self.cache.blocks_per_group:
            raise ValueError(f"the prompt's {prompt_len} tokens + {max_new_tokens} new tokens need {needed} KV blocks "
                             f"of {KV_BLOCK} positions, but the pool has {self.cache.blocks_per_group} per attention "
                             "group")

    def validate(self, prompt: Sequence[int], sampling: Sampling, keep_logits: bool = False) -> list[int]:
        """The prompt as a list of ids, once everything about the request is checked (a ValueError naming what
        is wrong): ids integers in the vocabulary, settings a `Sampling`, and it fits the context."""
        if not isinstance(sampling, Sampling):
            raise ValueError(f"sampling must be a Sampling, got {type(sampling).__name__}")
        if isinstance(prompt, (str, bytes)) or not isinstance(prompt, Sequence | np.ndarray):
            raise ValueError(f"a prompt must be a list of token ids, got {type(prompt).__name__}")
        ids = list(prompt)
        not_ids = [t for t in ids if not isinstance(t, numbers.Integral) or isinstance(t, bool)]
        if not_ids:
            raise ValueError(f"token ids must be integers, got {not_ids[:5]}")
        self.check(len(ids), sampling.max_new_tokens)
        outside = [t for t in ids if not 0 <= t < self.model.config.vocab_size]
        if outside:
            raise ValueError(f"token ids {sorted(set(outside))[:10]} are outside the vocabulary "
                             f"0..{self.model.config.vocab_size - 1}")
        if keep_logits and not self.keep_logits:
            raise ValueError("this engine was built with keep_logits=False: no request keeps its logits")
        return [int(t) for t in ids]

    def submit(self, prompt: Sequence[int], sampling: Sampling, notify: Notify | None = None,
               keep_logits: bool = False, constraint: "Constraint | None" = None) -> Request:
        """Queue a request (checked first, see `validate`); `notify` hears its tokens and its end from the
        engine's thread; `constraint` holds its tokens to a grammar."""
        ids = self.validate(prompt, sampling, keep_logits)
        self._check_usable()
        request = Request(ids, sampling, notify or (lambda kind, value: None), keep_logits, constraint=constraint)
        if self.speculative and constraint is None and not keep_logits:
            request.drafter = NgramDrafter(self.speculative, shared=self.answers, prompt=ids)
        with self._wake:
            self._inbox.append(request)
            self._wake.notify()
        return request

    def cancel(self, request: Request) -> None:
        """End a request (its client left, or a stop string was seen): its slot is freed at the next step."""
        with self._wake:
            self._cancelled.append(request)
            self._wake.notify()

    def _check_usable(self) -> None:
        if self._stopping:
            raise RuntimeError(f"the engine has stopped{': ' + self.failure if self.failure else ''}")
        if self.model.owner is not self:
            raise RuntimeError("this engine's model now serves a newer Engine (one engine per model: build the "
                               "new one after the old one's last request)")

    # --- running -------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Run steps on a thread of the engine's own until `stop`."""
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop taking requests, end every request in flight ('abort'), and stop the thread."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread:
            self._thread.join(timeout)

    def _loop(self) -> None:
        try:
            while True:
                with self._wake:
                    idle = not self._stopping and not self._has_work() and not self._wake.wait(IDLE_SECONDS)
                    if self._stopping:
                        break
                if idle:
                    self.executor.heartbeat()
                else:
                    self.step()
            self._fail_all(None)
            self.executor.stop()
        except Exception as err:  # noqa: BLE001 - every request in flight hears why the engine stopped
            self.failure = f"{type(err).__name__}: {err}"
            self._fail_all(self.failure)
            self.on_failure(self.failure)
        finally:
            self._stopping = True

    def _fail_all(self, message: str | None) -> None:
        """End every queued and running request: with an error event, or as aborted."""
        with self._wake:
            pending = self._inbox + list(self.scheduler.waiting) + list(self.scheduler.running)
            self._inbox = []
        for request in pending:
            if request.finish_reason is None:
                self.scheduler.finish(request)
                request.finish_reason = "error" if message else "abort"
                if message:
                    request.notify("error", message)
                request.notify("finish", request.finish_reason)

    def _has_work(self) -> bool:
        return bool(self._inbox or self._cancelled or self.scheduler.waiting or self.scheduler.running)

    def idle(self) -> bool:
        with self._wake:
            return not self._has_work()

    def running(self) -> bool:
        """The engine runs steps on a thread of its own."""
        return self._thread is not None and self._thread.is_alive()

    def step(self) -> None:
        """One engine step: take new requests and cancels, plan, copy, prefill, decode, deliver."""
        with self._wake:
            for request in self._inbox:
                self.scheduler.add(request)
            self._inbox = []
            cancelled, self._cancelled = self._cancelled, []
        for request in cancelled:
            self.runner.end(request, "cancelled")
        self.runner.run(self.scheduler.plan())

    # --- the Python API ------------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], sampling: Sampling | list[Sampling],
                 on_token: Callable[[int, int], None] | None = None, keep_logits: bool = False) -> list[Result]:
        """Generate for every prompt (of any lengths) at once; on_token(prompt index, id) as each comes.
        Every prompt and setting is checked before any is queued (a ValueError naming the first problem).
        Runs the steps on the calling thread unless the engine runs on its own; if a step fails there, every
        request in flight ends with an error, its slot freed, and the exception reaches the caller."""
        prompts = list(prompts)
        settings = list(sampling) if isinstance(sampling, (list, tuple)) else [sampling] * len(prompts)
        if len(settings) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(settings)} sampling settings: give one Sampling, or "
                             "one per prompt")
        for index, (prompt, setting) in enumerate(zip(prompts, settings)):
            try:
                self.validate(prompt, setting, keep_logits)
            except ValueError as err:
                raise ValueError(f"prompt {index}: {err}") from None
        self._check_usable()
        if not prompts:
            return []
        done = threading.Event()
        remaining = [len(prompts)]

        def notify_for(index: int) -> Notify:
            def notify(kind: str, value: object) -> None:
                if kind == "token" and on_token:
                    on_token(index, value)
                elif kind == "finish":
                    remaining[0] -= 1
                    if not remaining[0]:
                        done.set()
            return notify

        requests = [self.submit(p, s, notify_for(i), keep_logits) for i, (p, s) in enumerate(zip(prompts, settings))]
        if self._thread is None:
            while not done.is_set():
                try:
                    self.step()
                except Exception as err:
                    self._fail_all(f"{type(err).__name__}: {err}")
                    self._last_ids = None
                    raise
        else:
            done.wait()
        return [Result(r.prompt, r.generated, r.finish_reason, r.reused,
                       np.concatenate(r.logits) if keep_logits else None, r.logprobs)
                for r in requests]

    def load(self) -> dict[str, float]:
        """What the engine holds now (gauges): queue depth, running requests, rows (slots) and their occupancy,
        the KV pool's blocks: used by requests, cached (contents kept for reuse), never written; and the
        tokens a verified row gained per step on average (accepted drafts + 1; 0 before any)."""
        slots = self.max_num_seqs * self.groups
        busy = len(self.scheduler.running)
        return {"queue_depth": len(self.scheduler.waiting) + len(self._inbox), "running": busy, "slots": slots,
                "slots_busy": busy, "slot_occupancy": busy / slots, **self.cache.usage(),
                "mean_accepted_length": (self.stats["accepted_tokens"] / self.stats["verified_rows"] + 1
                                         if self.stats["verified_rows"] else 0.0)}

    def counters(self) -> dict[str, float]:
        """What only grows: steps, tokens and seconds, drafts taken from other requests' answers, and the
        executor's (plans and control bytes)."""
        return {**self.stats, "preemptions": self.scheduler.preemptions,
                "shared_drafts": self.answers.hits if self.answers else 0, **self.executor.stats()}

    def metrics(self) -> dict[str, float]:
        """`load` and `counters` together, for logs and tests."""
        return {**self.load(), **self.counters()}
