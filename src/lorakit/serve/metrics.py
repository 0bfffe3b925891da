"""Prometheus metrics of one server, in its own CollectorRegistry (two servers in a process never mix).

    lorakit_requests_total{model, finish_reason}        requests finished (stop, length, cancelled, error)
    lorakit_prompt_tokens_total{model}, lorakit_generation_tokens_total{model}
    lorakit_queue_depth                                  requests waiting (inbox included)
    lorakit_running_sequences, lorakit_waiting_sequences
    lorakit_resident_adapters                            adapters attached to the model
    lorakit_resident_adapter_bytes, lorakit_host_cache_bytes   the two memory tiers' adapter bytes
    lorakit_host_cache_peak_bytes, lorakit_host_cache_capacity_bytes   its high-water mark and budget
    lorakit_adapter_reads_total, lorakit_adapter_attaches_total   disk reads, attaches to the model
    lorakit_request_latency_seconds{model}               arrival -> finish (histogram)
    lorakit_time_to_first_token_seconds{model}           arrival -> first token (histogram)
    lorakit_engine_steps_total
"""

from __future__ import annotations

import time

from ..errors import LorakitError

try:
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
except ImportError:  # pragma: no cover - the serve extra is missing
    CollectorRegistry = None

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """The server's metrics; the engine calls step() and finished() on its thread."""

    def __init__(self, names):
        if CollectorRegistry is None:
            raise LorakitError("lorakit serve needs prometheus_client: pip install 'lorakit[serve]'")
        self.names = names  # adapter name -> served model name (BASE -> the --model value)
        r = self.registry = CollectorRegistry()
        self.requests = Counter("lorakit_requests", "Requests finished", ["model", "finish_reason"], registry=r)
        self.prompt_tokens = Counter("lorakit_prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.generation_tokens = Counter("lorakit_generation_tokens", "Tokens generated", ["model"], registry=r)
        self.queue = Gauge("lorakit_queue_depth", "Requests waiting to start", registry=r)
        self.running = Gauge("lorakit_running_sequences", "Sequences in the running batch", registry=r)
        self.waiting = Gauge("lorakit_waiting_sequences", "Sequences waiting", registry=r)
        self.resident = Gauge("lorakit_resident_adapters", "Adapters attached to the model", registry=r)
        self.latency = Histogram("lorakit_request_latency_seconds", "Arrival to finish", ["model"],
                                 buckets=BUCKETS, registry=r)
        self.ttft = Histogram("lorakit_time_to_first_token_seconds", "Arrival to first token", ["model"],
                              buckets=BUCKETS, registry=r)
        self.steps = Counter("lorakit_engine_steps", "Engine steps run", registry=r)
        self.resident_bytes = Gauge("lorakit_resident_adapter_bytes", "Bytes of attached adapters", registry=r)
        self.host_bytes = Gauge("lorakit_host_cache_bytes", "Bytes of adapters cached in host memory", registry=r)
        self.host_peak = Gauge("lorakit_host_cache_peak_bytes", "Most bytes the host cache has held", registry=r)
        self.host_capacity = Gauge("lorakit_host_cache_capacity_bytes", "--host-cache-bytes", registry=r)
        self.reads = Gauge("lorakit_adapter_reads_total", "Adapter folders read from disk", registry=r)
        self.attaches = Gauge("lorakit_adapter_attaches_total", "Adapter versions attached", registry=r)

    def step(self, engine) -> None:
        running, waiting = engine.depth()
        self.steps.inc()
        self.running.set(running)
        self.waiting.set(waiting)
        self.queue.set(waiting)
        reg = engine.registry
        self.resident.set(len(reg.resident))
        self.resident_bytes.set(reg.resident_bytes)
        self.host_bytes.set(reg.host.bytes)
        self.host_peak.set(reg.host.peak)
        self.host_capacity.set(reg.host.capacity)
        self.reads.set(reg.loader.reads)
        self.attaches.set(reg.attaches)

    def finished(self, req, reason: str) -> None:
        model = self.names(req.adapter)
        self.requests.labels(model, reason).inc()
        self.prompt_tokens.labels(model).inc(len(req.prompt_ids))
        self.generation_tokens.labels(model).inc(len(req.out_ids))
        if req.t_first is not None:
            self.ttft.labels(model).observe(req.t_first - req.t_arrival)
        self.latency.labels(model).observe(time.perf_counter() - req.t_arrival)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
