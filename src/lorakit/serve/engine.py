"""The serving engine: continuous batching of many requests over one base model and many adapters.

Written here rather than on transformers' continuous batching (generation/continuous_batching):
that one has no per-request adapter field reaching the forward (routing tokens to adapters needs
its private batch state), its prefix sharing reuses KV blocks across requests whatever their adapter
(wrong tokens for adapter requests, on by default), its sampling flags are global, and its CPU
defaults allocate a multi-GB mask. See docs/serving.md.

One step (Engine.step, on the engine thread):
  1. apply what arrived (new requests, cancels, adapter loads / unloads) and drop cancelled requests;
  2. schedule under a token budget (max_batch_tokens): every running sequence feeds its one pending
     token (decode), then waiting requests are admitted while the budget and max_running allow:
     first any that waited longer than `max_wait_s` (oldest first: nobody starves), then those
     whose adapter is resident (or the base), then the rest in arrival order. A prompt longer than
     what is left is split (chunked prefill). A request whose adapter is not resident waits (its
     read started when it arrived, on the loader thread) without holding up the others; one that
     waited past max_wait_s and finds every resident slot busy stops further admissions until a
     slot frees, so hot adapters cannot keep it out forever;
  3. order the step's sequences by adapter rank, then adapter, and lay their tokens end to end in
     one row (1, N): ids, positions, per-sequence bounds; the last token of each sequence that reaches its end emits;
  4. one forward under a TokenPlan (each adapter's tokens one slice; short slices, i.e. decoding
     tokens, gathered per rank from slot pools: `lora_path`, see layers/tokens.py; on CPU read in place
     by the compiled BGMV kernel when it builds: `kernel`, layers/bgmv.py) and the KV
     cache's attention (cache.py), logits only for the emitting tokens (logits_to_keep);
  5. sample per request (greedy rows: one argmax for all), detect EOS / stop strings / max_tokens /
     max_model_len, send the deltas (a Batched sink's at the end of the step: one wake-up per loop).
Sequences join and leave at token boundaries; prefill and decode share steps.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from ..errors import LorakitError
from ..layers import BASE, Pools, TokenPlan, bgmv, using_row_plan
from .cache import SequenceKV, StepLayout, attention_configs, running
from .sampling import SamplingParams, TextTracker, next_token


LORA_PATHS = {"segments": lambda: None, "ranks": Pools, "padded": lambda: Pools(padded=True)}


@dataclass
class Delta:
    """What a request's sink receives: new text, and on the last one the finish reason and counts."""
    text: str
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


@dataclass
class Request:
    prompt_ids: list[int]
    adapter: str  # BASE or an adapter's served name
    params: SamplingParams
    sink: object  # callable(Delta), called on the engine thread
    rid: int = 0
    out_ids: list[int] = field(default_factory=list)
    kv: SequenceKV = field(default_factory=SequenceKV)
    cancelled: bool = False
    t_arrival: float = field(default_factory=time.perf_counter)
    t_first: float | None = None
    slot: str = BASE  # the attached adapter version the forward runs (set when the request starts)

    def pending(self) -> list[int]:
        """Tokens not yet in the KV cache."""
        return (self.prompt_ids + self.out_ids)[self.kv.length:]


class Engine:
    """Continuous batching over `model`; `registry` (registry.Registry) owns the adapters."""

    def __init__(self, model, tokenizer, registry, max_batch_tokens: int = 256, max_running: int = 64,
                 max_model_len: int | None = None, metrics=None, max_wait_s: float = 2.0,
                 lora_path: str = "ranks", gather_min: int = 4, kernel: str = "auto"):
        self.model, self.tokenizer, self.registry, self.metrics = model, tokenizer, registry, metrics
        self.budget, self.max_running = max(1, max_batch_tokens), max_running
        self.max_wait_s = max_wait_s
        if lora_path not in LORA_PATHS:
            raise LorakitError(f"lora_path {lora_path!r} must be one of {sorted(LORA_PATHS)}")
        self.pools = LORA_PATHS[lora_path]()  # the slot pools of this engine (None: per-adapter GEMMs only)
        self.gather_min = gather_min  # a rank's short slices in a layer from which they are gathered (TokenPlan)
        if kernel not in ("auto", "off"):
            raise LorakitError(f"kernel {kernel!r} must be 'auto' (the compiled BGMV kernel when it builds) or 'off'")
        first = next(model.parameters())
        fp32_cpu = first.device.type == "cpu" and first.dtype == torch.float32  # where the kernel can run
        # the gather reads the pools in place (layers/bgmv.py); built here, before the first request
        self.kernel = bgmv.load() if kernel == "auto" and self.pools is not None and fp32_cpu else None
        self.max_model_len = max_model_len or getattr(model.config, "max_position_embeddings", None) or 2048
        self.eos = _eos_ids(model, tokenizer)
        self.configs = attention_configs(model)
        self.inbox: queue.Queue = queue.Queue()
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.steps = 0
        self._out: list | None = None  # the current step's deltas for Batched sinks (engine thread)

    # -- the inbox (any thread) ------------------------------------------------------------------------

    def submit(self, request: Request) -> Request:
        request.rid = next(self._ids)
        request.tracker = TextTracker(self.tokenizer, request.params.stop)
        request.generator = request.params.generator()
        if request.adapter != BASE:  # its read starts now, off the request path
            self.registry.prefetch(request.adapter, self.wake)
        self.inbox.put(("add", request))
        return request

    def wake(self) -> None:
        self.inbox.put(("wake", None))

    def cancel(self, request: Request) -> None:
        request.cancelled = True  # read at the next step
        self.inbox.put(("wake", None))

    def call(self, fn) -> Future:
        """Run fn() on the engine thread between steps (adapter attach / detach); its result's future."""
        future: Future = Future()
        self.inbox.put(("call", (fn, future)))
        return future

    def depth(self) -> tuple[int, int]:
        """(running, waiting) sequences."""
        return len(self.running), len(self.waiting) + self.inbox.qsize()

    # -- the thread ------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="lorakit-engine", daemon=True)
        self._thread.start()

    def stop(self, drain: bool = True, timeout: float = 30.0) -> None:
        """Stop the loop; with `drain`, after the running and waiting requests finish."""
        if not drain:
            for r in self.running + self.waiting:
                r.cancelled = True
        self._stop.set()
        self.inbox.put(("wake", None))
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        idle = True  # the last step had nothing to run (empty, or every waiting request's adapter loading)
        while True:
            busy = bool(self.running or self.waiting)
            if self._stop.is_set() and not busy and self.inbox.empty():
                return
            timeout = None if not busy and not self._stop.is_set() else 0.01 if idle else 0.0
            try:
                self._apply(*self.inbox.get(timeout=timeout))
            except queue.Empty:
                pass
            idle = not self.step() if (self.running or self.waiting) else True

    def _apply(self, kind: str, item) -> None:
        items = [(kind, item)]
        while True:
            try:
                items.append(self.inbox.get_nowait())
            except queue.Empty:
                break
        for kind, item in items:
            if kind == "add":
                self.waiting.append(item)
            elif kind == "call":
                fn, future = item
                try:
                    future.set_result(fn())
                except Exception as e:  # handed to the caller, who answers the client
                    future.set_exception(e)

    # -- one step --------------------------------------------------------------------------------------

    def drain_inbox(self) -> None:
        try:
            self._apply(*self.inbox.get_nowait())
        except queue.Empty:
            pass

    def step(self) -> bool:
        """One forward over the scheduled tokens; False when there was nothing to do."""
        self.drain_inbox()
        self._drop_cancelled()
        batch = self._schedule()
        if not batch:
            return False
        rank = self.registry.rank
        batch.sort(key=lambda entry: (rank(entry[0].slot), entry[0].slot))  # each adapter's tokens one slice
        ids, positions, names, bounds, emit = [], [], [], [], []
        for req, tokens in batch:
            lo = len(ids)
            ids += tokens
            positions += range(req.kv.length, req.kv.length + len(tokens))
            names += [req.slot] * len(tokens)
            bounds.append((lo, len(ids)))
            if req.kv.length + len(tokens) == len(req.prompt_ids) + len(req.out_ids):
                emit.append((req, len(ids) - 1))
        plan = TokenPlan(names, [names[i] for _, i in emit], self.pools, gather_min=self.gather_min, kernel=self.kernel)
        layout = StepLayout([req.kv for req, _ in batch], bounds)
        device = next(self.model.parameters()).device
        with torch.inference_mode(), using_row_plan(plan), running(self.configs, layout):
            logits = self.model(input_ids=torch.tensor([ids], device=device),
                                position_ids=torch.tensor([positions], device=device), use_cache=False,
                                logits_to_keep=torch.tensor([i for _, i in emit], dtype=torch.long,
                                                            device=device)).logits[0]
        for req, tokens in batch:
            req.kv.length += len(tokens)
        greedy = greedy_ids(logits) if emit else []  # one op for every greedy row
        self._out = []
        for (req, _), row, best in zip(emit, logits, greedy):
            self._emit(req, best if req.params.temperature == 0 else next_token(row, req.params, req.generator))
        self._deliver()
        self.steps += 1
        if self.metrics is not None:
            self.metrics.step(self)
        return True

    def _drop_cancelled(self) -> None:
        for group in (self.running, self.waiting):
            for req in [r for r in group if r.cancelled]:
                group.remove(req)
                self._finish(req, "cancelled")

    def _schedule(self) -> list[tuple[Request, list[int]]]:
        batch, budget = [], self.budget
        for req in self.running:  # decodes (and unfinished prompt chunks) first
            chunk = req.pending()[:budget]
            if chunk:
                batch.append((req, chunk))
                budget -= len(chunk)
        for req in self._admission_order():
            if budget <= 0 or len(self.running) >= self.max_running:
                break
            try:
                slot = BASE if req.adapter == BASE else self.registry.ready(req.adapter, self, self.wake)
            except LorakitError as e:  # the adapter cannot be served: fail its request, serve the rest
                self.waiting.remove(req)
                self._finish(req, "error", str(e))
                continue
            if slot is None:
                if self._starving(req) and self.registry.no_room:
                    break  # read but every slot busy: admit nobody else until one frees for it
                continue  # loading: the others go ahead
            req.slot = slot
            self.waiting.remove(req)
            self.running.append(req)
            self.registry.touch(slot)
            chunk = req.pending()[:budget]
            batch.append((req, chunk))
            budget -= len(chunk)
        return batch

    def _starving(self, req: Request) -> bool:
        return time.perf_counter() - req.t_arrival > self.max_wait_s

    def _admission_order(self) -> list[Request]:
        """Starving requests (oldest first), then those whose adapter is resident, then the rest; each
        group in arrival order (the waiting list is kept in arrival order)."""
        resident = self.registry.current
        starving = [r for r in self.waiting if self._starving(r)]
        rest = [r for r in self.waiting if not self._starving(r)]
        warm = [r for r in rest if r.adapter == BASE or r.adapter in resident]
        cold = [r for r in rest if not (r.adapter == BASE or r.adapter in resident)]
        return starving + warm + cold

    def _emit(self, req: Request, token: int) -> None:
        if req.t_first is None:
            req.t_first = time.perf_counter()
        finish = None
        if token in self.eos:
            finish = "stop"
        else:
            req.out_ids.append(token)
            req.tracker.update(req.out_ids)
            if req.tracker.stopped is not None:
                finish = "stop"
            elif len(req.out_ids) >= req.params.max_tokens or \
                    len(req.prompt_ids) + len(req.out_ids) >= self.max_model_len:
                finish = "length"
        if finish is None:
            text = req.tracker.delta(final=False)
            if text:
                self._send(req, Delta(text))
            return
        self.running.remove(req)
        self._finish(req, finish)

    def _finish(self, req: Request, reason: str, error: str | None = None) -> None:
        req.kv.free()
        text = req.tracker.delta(final=True) if reason not in ("cancelled", "error") else ""
        self._send(req, Delta(text, reason, len(req.prompt_ids), len(req.out_ids), error))
        if self.metrics is not None:
            self.metrics.finished(req, reason)


    def _send(self, req: Request, delta: Delta) -> None:
        """Hand `delta` to the request's sink: a Batched sink's deltas wait for the end of the step (one
        wake-up of its event loop per step, not per token); any other callable is called now."""
        if isinstance(req.sink, Batched) and self._out is not None:
            self._out.append((req.sink, delta))
        else:
            req.sink(delta)

    def _deliver(self) -> None:
        """The step's Batched deltas: one call per event loop, in emission order."""
        out, self._out = self._out, None
        by_loop: dict = {}
        for sink, delta in out or ():
            by_loop.setdefault(sink.loop, []).append((sink.put, delta))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_put_all, items)


class Batched:
    """A sink living on an asyncio loop: `put(delta)` runs on `loop`. The engine hands a step's deltas
    for one loop over in a single call_soon_threadsafe (each costs a wake-up write to the loop)."""

    def __init__(self, loop, put):
        self.loop, self.put = loop, put

    def __call__(self, delta: Delta) -> None:  # outside a step (a cancel, a failed admission)
        self.loop.call_soon_threadsafe(self.put, delta)


def _put_all(items: list) -> None:
    for put, delta in items:
        put(delta)


def greedy_ids(logits: torch.Tensor) -> list[int]:
    """argmax of each row (K, vocab) as ints, the first maximum on ties (as torch.argmax). On CPU numpy's
    argmax: it is vectorised, about 10x faster than torch's over a 49k vocabulary, which at 32 rows a step
    was an eighth of the step (docs/benchmarks.md, serving)."""
    logits = logits.float()
    if logits.device.type == "cpu":
        return logits.numpy().argmax(-1).tolist()
    return logits.argmax(-1).tolist()


def _eos_ids(model, tokenizer) -> set[int]:
    """The ids `generate` stops at: the generation config's eos (int or list), else the model config's."""
    for source in (getattr(model, "generation_config", None), model.config):
        eos = getattr(source, "eos_token_id", None)
        if eos is not None:
            return set(eos) if isinstance(eos, (list, tuple)) else {eos}
    return {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
