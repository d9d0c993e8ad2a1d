"""Benchmark results -> metrics (mean, p50, p99), throughput, goodput; a JSON document and a PNG chart.

The chart is drawn with Pillow (already a dependency): the sorted TTFT, TPOT and end-to-end
latencies of every request, one panel each, so the tails are visible.
"""

from __future__ import annotations

from typing import Any

from PIL import Image, ImageDraw

from runtime.benchmark.client import RequestResult


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0}
    ordered = sorted(values)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))]

    return {"mean": sum(ordered) / len(ordered), "p50": pct(50), "p90": pct(90), "p99": pct(99), "max": ordered[-1]}


def summarize(results: list[RequestResult], wall_s: float, ttft_target_ms: float | None = None,
              tpot_target_ms: float | None = None) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    output = sum(r.output_tokens for r in ok)
    prompt = sum(r.prompt_tokens for r in ok)
    ms = 1e3
    summary: dict[str, Any] = {
        "requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({f"{r.status}: {r.error[:200]}" for r in results if not r.ok})[:10],
        "wall_s": wall_s,
        "request_throughput": len(ok) / wall_s if wall_s else 0.0,
        "output_token_throughput": output / wall_s if wall_s else 0.0,
        "total_token_throughput": (prompt + output) / wall_s if wall_s else 0.0,
        "prompt_tokens": prompt,
        "output_tokens": output,
        "ttft_ms": {k: v * ms for k, v in _stats([r.ttft_s for r in ok]).items()},
        "tpot_ms": {k: v * ms for k, v in _stats([r.tpot_s for r in ok if r.output_tokens > 1]).items()},
        "itl_ms": {k: v * ms for k, v in _stats([g for r in ok for g in r.itl_s]).items()},
        "e2e_ms": {k: v * ms for k, v in _stats([r.e2e_s for r in ok]).items()},
    }
    if ttft_target_ms is not None or tpot_target_ms is not None:
        good = [r for r in ok if (ttft_target_ms is None or r.ttft_s * ms <= ttft_target_ms)
                and (tpot_target_ms is None or r.tpot_s * ms <= tpot_target_ms)]
        summary["goodput"] = {"ttft_target_ms": ttft_target_ms, "tpot_target_ms": tpot_target_ms,
                              "requests": len(good), "request_throughput": len(good) / wall_s if wall_s else 0.0}
    return summary


def table(summary: dict[str, Any]) -> str:
    rows = [("completed / failed", f"{summary['completed']} / {summary['failed']}"),
            ("request throughput (req/s)", f"{summary['request_throughput']:.2f}"),
            ("output tokens/s", f"{summary['output_token_throughput']:.1f}"),
            ("total tokens/s", f"{summary['total_token_throughput']:.1f}")]
    for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        s = summary[name]
        rows.append((f"{name[:-3].upper()} ms mean / p50 / p99", f"{s['mean']:.1f} / {s['p50']:.1f} / {s['p99']:.1f}"))
    if "goodput" in summary:
        rows.append(("goodput (req/s)", f"{summary['goodput']['request_throughput']:.2f}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def chart(results: list[RequestResult], path: str, title: str = "") -> None:
    """Three panels of sorted per-request latencies (ms): TTFT, TPOT, end to end."""
    ok = [r for r in results if r.ok]
    panels = [("TTFT ms", [r.ttft_s * 1e3 for r in ok]), ("TPOT ms", [r.tpot_s * 1e3 for r in ok]),
              ("end-to-end ms", [r.e2e_s * 1e3 for r in ok])]
    w, h, pad = 420, 300, 40
    image = Image.new("RGB", (w * len(panels), h + 30), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 5), title, fill="black")
    for i, (name, values) in enumerate(panels):
        x0, y0, x1, y1 = i * w + pad, 30 + 20, (i + 1) * w - 10, h
        draw.rectangle((x0, y0, x1, y1), outline="black")
        draw.text((x0, y0 - 15), f"{name} (sorted requests)", fill="black")
        if not values:
            continue
        ordered, top = sorted(values), max(max(values), 1e-9)
        draw.text((i * w + 2, y0), f"{top:.0f}", fill="gray")
        draw.text((i * w + 2, y1 - 10), "0", fill="gray")
        points = [(x0 + (x1 - x0) * j / max(len(ordered) - 1, 1), y1 - (y1 - y0) * v / top)
                  for j, v in enumerate(ordered)]
        draw.line(points if len(points) > 1 else points * 2, fill=(30, 90, 200), width=2)
    image.save(path)
