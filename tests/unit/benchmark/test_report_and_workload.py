"""Benchmark pieces: the workload's image-reuse ratio and the report's percentiles and goodput."""

from __future__ import annotations

from runtime.benchmark.client import RequestResult
from runtime.benchmark.report import chart, summarize
from runtime.benchmark.workload import WorkloadSpec, build_requests


def _image_urls(bodies):
    return [p["image_url"]["url"] for b in bodies for p in b["messages"][0]["content"] if p["type"] == "image_url"]


def test_image_reuse_ratio_is_respected_and_reproducible() -> None:
    fresh = _image_urls(build_requests(WorkloadSpec(num_requests=40, image_width=28, image_height=28), "m"))
    assert len(set(fresh)) == 40
    spec = WorkloadSpec(num_requests=200, image_width=28, image_height=28, image_reuse=0.8, seed=3)
    reused = _image_urls(build_requests(spec, "m"))
    assert 0.7 < 1 - len(set(reused)) / len(reused) < 0.9
    assert reused == _image_urls(build_requests(spec, "m"))
    body = build_requests(WorkloadSpec(num_requests=1, images_per_request=0, input_len=5), "m")[0]
    assert body["max_tokens"] == 64 and body["stream"] and len(body["messages"][0]["content"]) == 1


def test_summary_percentiles_throughput_and_goodput(tmp_path) -> None:
    results = [RequestResult(True, 200, ttft_s=0.01 * (i + 1), e2e_s=0.01 * (i + 1) + 0.099, prompt_tokens=10,
                             output_tokens=10, itl_s=[0.011] * 9) for i in range(100)]
    results.append(RequestResult(False, 500, "boom"))
    summary = summarize(results, wall_s=2.0, ttft_target_ms=500, tpot_target_ms=12)
    assert summary["completed"] == 100 and summary["failed"] == 1 and summary["errors"] == ["500: boom"]
    assert summary["output_token_throughput"] == 500.0 and summary["total_token_throughput"] == 1000.0
    assert round(summary["ttft_ms"]["p50"]) in (500, 510) and round(summary["ttft_ms"]["p99"]) == 990
    assert abs(summary["tpot_ms"]["mean"] - 11.0) < 1e-6
    assert summary["goodput"]["requests"] == 50  # ttft <= 500 ms: requests 0..49
    chart(results, str(tmp_path / "c.png"), "t")
    assert (tmp_path / "c.png").stat().st_size > 1000
