"""Router-side request metrics (TTFT, TPOT, end-to-end latency, status counts) and the
Prometheus text exposition of those plus every replica's stats from the stats board."""

from __future__ import annotations

import bisect
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass
class Histogram:
    counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS_S) + 1))
    total: float = 0.0
    n: int = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS_S, seconds)] += 1
        self.total += seconds
        self.n += 1

    def snapshot(self) -> dict[str, Any]:
        return {"count": self.n, "sum": self.total, "mean": self.total / self.n if self.n else 0.0,
                "buckets": dict(zip([str(b) for b in BUCKETS_S] + ["+Inf"], self.counts, strict=True))}


class RequestTimer:
    def __init__(self, metrics: RouterMetrics):
        self.metrics, self.started = metrics, time.perf_counter()
        self.first: float | None = None
        self.tokens_seen = 0

    def tokens(self, n: int) -> None:
        if n and self.first is None:
            self.first = time.perf_counter()
            self.metrics.ttft.observe(self.first - self.started)
        self.tokens_seen += n

    def finish(self) -> None:
        now = time.perf_counter()
        self.metrics.e2e.observe(now - self.started)
        if self.first is not None and self.tokens_seen > 1:
            self.metrics.tpot.observe((now - self.first) / (self.tokens_seen - 1))


class RouterMetrics:
    def __init__(self) -> None:
        self.ttft, self.tpot, self.e2e = Histogram(), Histogram(), Histogram()
        self.responses: Counter[int] = Counter()

    def timer(self) -> RequestTimer:
        return RequestTimer(self)

    def count(self, status: int) -> None:
        self.responses[status] += 1

    def snapshot(self, in_flight: int) -> dict[str, Any]:
        return {"in_flight": in_flight, "responses": {str(k): v for k, v in sorted(self.responses.items())},
                "ttft_s": self.ttft.snapshot(), "tpot_s": self.tpot.snapshot(), "e2e_s": self.e2e.snapshot()}


def prometheus_text(stats: dict[str, Any], model: str = "") -> str:
    """Prometheus text format (0.0.4) from the router's /stats document: our kimi_* metrics, and
    vLLM's names for those that mean the same (so dashboards built for vLLM work)."""
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[dict[str, str], float]]) -> None:
        _write(lines, f"kimi_{name}", kind, help_text, samples)

    router = stats["router"]
    metric("requests_total", "counter", "HTTP responses by status",
           [({"status": s}, n) for s, n in router["responses"].items()])
    metric("requests_in_flight", "gauge", "requests this router replica is serving", [({}, router["in_flight"])])
    for name, help_text in (("ttft_s", "time to first token"), ("tpot_s", "time per output token after the first"),
                            ("e2e_s", "end-to-end request latency")):
        _histogram(lines, f"kimi_{name}", help_text, router[name], {})

    lm = stats.get("lm", {})
    for key, kind, help_text in (("running", "gauge", "requests running in the engine"),
                                 ("waiting", "gauge", "requests queued in the engine"),
                                 ("kv_blocks_used", "gauge", "KV cache blocks in use"),
                                 ("kv_blocks_total", "gauge", "KV cache blocks"),
                                 ("prefix_hit_tokens", "counter", "prompt tokens served from the prefix cache"),
                                 ("generated_tokens", "counter", "tokens generated"),
                                 ("preemptions", "counter", "requests preempted")):
        metric(f"lm_{key}", kind, help_text, [({"replica": r}, s["engine"][key]) for r, s in lm.items()])
    vision = stats.get("vision", {})
    for key, kind, help_text in (("entries", "gauge", "embedding cache entries"),
                                 ("bytes", "gauge", "embedding cache bytes"),
                                 ("live_references", "gauge", "cache references held by live requests"),
                                 ("hits", "counter", "embedding cache hits"),
                                 ("misses", "counter", "embedding cache misses"),
                                 ("evictions", "counter", "embedding cache evictions")):
        metric(f"vision_cache_{key}", kind, help_text, [({"replica": r}, s["cache"][key]) for r, s in vision.items()])
    _vllm_metrics(lines, stats, model)
    return "\n".join(lines) + "\n"


def _write(lines: list[str], name: str, kind: str, help_text: str, samples: list[tuple[dict[str, str], float]]) -> None:
    lines.append(f"# HELP {name} {help_text}")
    lines.append(f"# TYPE {name} {kind}")
    for labels, value in samples:
        label = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
        lines.append(f"{name}{{{label}}} {value}" if label else f"{name} {value}")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _histogram(lines: list[str], name: str, help_text: str, h: dict[str, Any], labels: dict[str, str]) -> None:
    label = "".join(f',{k}="{_escape(v)}"' for k, v in labels.items())
    lines.append(f"# HELP {name} {help_text}")
    lines.append(f"# TYPE {name} histogram")
    running = 0
    for bound, n in h["buckets"].items():
        running += n
        lines.append(f'{name}_bucket{{le="{bound}"{label}}} {running}')
    plain = f"{{{label.lstrip(',')}}}" if labels else ""
    lines.append(f"{name}_sum{plain} {h['sum']}")
    lines.append(f"{name}_count{plain} {h['count']}")


def _vllm_metrics(lines: list[str], stats: dict[str, Any], model: str) -> None:
    """vLLM's metric names, summed over this app's LM replicas, labelled by model_name."""
    engines = [s["engine"] for s in stats.get("lm", {}).values()]
    labels = {"model_name": model}

    def total(key: str) -> float:
        return sum(e[key] for e in engines)

    blocks = total("kv_blocks_total")
    usage = total("kv_blocks_used") / blocks if blocks else 0.0
    hits = total("prefix_hit_tokens")
    prompt = total("prefill_tokens") + total("prefix_hit_tokens")
    for name, kind, help_text, value in (
        ("num_requests_running", "gauge", "requests in the engines' running batches", total("running")),
        ("num_requests_waiting", "gauge", "requests waiting in the engines' queues", total("waiting")),
        ("kv_cache_usage_perc", "gauge", "KV cache usage (1 = full)", usage),
        ("prompt_tokens_total", "counter", "prompt tokens processed (computed or from the prefix cache)", prompt),
        ("generation_tokens_total", "counter", "tokens generated", total("generated_tokens")),
        ("prefix_cache_queries_total", "counter", "prompt tokens looked up in the prefix cache", prompt),
        ("prefix_cache_hits_total", "counter", "prompt tokens served from the prefix cache", hits),
        ("num_preemptions_total", "counter", "requests preempted", total("preemptions")),
    ):
        _write(lines, f"vllm:{name}", kind, help_text, [(labels, value)])
    router = stats["router"]
    for name, key, help_text in (("time_to_first_token_seconds", "ttft_s", "time to first token"),
                                 ("time_per_output_token_seconds", "tpot_s", "time per output token after the first"),
                                 ("e2e_request_latency_seconds", "e2e_s", "end-to-end request latency")):
        _histogram(lines, f"vllm:{name}", help_text, router[key], labels)
