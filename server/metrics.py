"""Prometheus metrics, named in vLLM's style under our own prefix."""
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

PREFIX = "nanoserve"


class Metrics:
    def __init__(self, engine):
        self.registry = CollectorRegistry()
        scheduler, pool = engine.scheduler, engine.pool
        gauge = lambda name, doc, fn: Gauge(f"{PREFIX}:{name}", doc, registry=self.registry).set_function(fn)  # noqa: E731
        gauge("num_requests_running", "Requests in the running batch.", lambda: len(scheduler.running))
        gauge("num_requests_waiting", "Requests waiting to be scheduled.", lambda: len(scheduler.waiting))
        gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1).", lambda: pool.usage)
        self.requests = Counter(f"{PREFIX}:request_success", "Finished requests by finish reason.",
                                ["finished_reason"], registry=self.registry)
        self.prompt_tokens = Counter(f"{PREFIX}:prompt_tokens", "Prompt tokens processed.", registry=self.registry)
        self.generation_tokens = Counter(f"{PREFIX}:generation_tokens", "Tokens generated.", registry=self.registry)

    def finished(self, prompt_tokens: int, generated: int, reason: str | None) -> None:
        self.requests.labels(finished_reason=reason or "abort").inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(generated)

    def render(self) -> bytes:
        return generate_latest(self.registry)
