"""Vision embeddings between processes: our ZMQ path vs an in-process memcpy vs a Ray return, and
images/s of the vision encoder, in one run.

    python bench/vision_transport.py [--quick] [--out bench/results/vision_transport.json]

Payloads are float32 embeddings [n_tokens, 7168] (the real model's hidden size), n_tokens =
nominal bytes // (4 * 7168), at least 1; the JSON keeps the exact byte counts. Every path sends
a tensor made once per size, so only the transfer is timed.

- zmq: `runtime.transport.EmbeddingSender` in this process pushes to an `EmbeddingInbox` in a
  spawned child process (as vision replica -> LM replica). The inbox callback answers every message
  with a non-empty content_hash with a small ZMQ message back. Latency = send -> inbox callback ->
  ack received: one payload hop plus one small hop (the JSON also has a one-way estimate, the round
  trip minus half the round trip of a 4-byte message). Bandwidth = N messages sent back to back,
  only the last one acked (PUSH/PULL keeps order): total bytes / time until that ack.
- memcpy: `dst.copy_(src)` on preallocated tensors, one torch thread. Latency = one copy;
  bandwidth = N copies back to back. Bytes are counted once (not read + write).
- ray: a plain Ray actor (not a Serve deployment) holds the tensor; its method returns it.
  Latency = `ray.get` of one call: one small hop (the call) plus one payload hop (the return), the
  same shape as the zmq round trip. Bandwidth = N calls in flight together, total bytes / time to
  `ray.get` them all. Default Ray serialization: a torch tensor is pickled (zero-copy tensors are
  off unless RAY_ENABLE_ZERO_COPY_TORCH_TENSORS is set); returns over about 100 KB go through the
  object store, smaller ones inline.
- ray_numpy: the same actor returning `tensor.numpy()`, Ray's fast case: one copy into the
  shared-memory object store, read back without a copy.
- vision: the `tiny` checkpoint's MoonViT tower + projector (`load_vision`) on B random 224x224
  PNGs, decoded and preprocessed outside the timing; `tower(pixels, grids)` under inference_mode.
  Then the whole `VisionEncoder.encode` path (decode, preprocess, batcher, tower, ZMQ push) into the
  child's inbox, with fresh images on every call so the embedding cache never hits; timed until
  the inbox has acked all B images.

Latencies are median and p90 over the repetitions. Bandwidth is the median over a few bursts of
about target_bytes each (see Plan); GB/s is 1e9 bytes/s.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from pathlib import Path

import msgspec
import numpy as np
import ray
import torch
import zmq
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runtime.checkpoint.loader import load_vision  # noqa: E402
from runtime.checkpoint.maker import make_checkpoint  # noqa: E402
from runtime.images import image_key, load_processor_config, placeholder_count  # noqa: E402
from runtime.models.config import load_model_config  # noqa: E402
from runtime.settings import VisionConfig  # noqa: E402
from runtime.transport import EmbeddingInbox, EmbeddingSender  # noqa: E402
from runtime.vision_service.encoder import ImageInput, VisionEncoder  # noqa: E402
from runtime.vision_service.preprocess import decode_image, preprocess_batch  # noqa: E402

HIDDEN = 7168  # Kimi-K2.5's text hidden size: the width of every embedding the LM receives
KIB, MIB = 2**10, 2**20
FULL_SIZES = [64 * KIB, 256 * KIB, 1 * MIB, 4 * MIB, 16 * MIB, 64 * MIB]
QUICK_SIZES = [s for s in FULL_SIZES if s <= 16 * MIB]
BATCH_SIZES = [1, 2, 4, 8, 16]
ACK = "ack"  # content_hash value that asks the bench inbox for an ack


# --- helpers -----------------------------------------------------------------------------------


def embeddings_of_size(nbytes: int) -> torch.Tensor:
    rows = max(1, nbytes // (4 * HIDDEN))
    return torch.rand(rows, HIDDEN, generator=torch.Generator().manual_seed(rows))


def latency_stats(seconds: list[float]) -> dict:
    p90 = statistics.quantiles(seconds, n=10, method="inclusive")[-1] if len(seconds) > 1 else seconds[0]
    return {"median_s": statistics.median(seconds), "p90_s": p90, "reps": len(seconds)}


@dataclass(frozen=True)
class Plan:
    reps: int  # timed repetitions per latency
    target_bytes: int  # bytes moved per bandwidth round
    most: int  # cap on messages per round (small payloads)
    rounds: int  # bandwidth rounds; the median is reported
    vision_reps: int


FULL = Plan(reps=30, target_bytes=512 * MIB, most=2000, rounds=3, vision_reps=20)
QUICK = Plan(reps=8, target_bytes=64 * MIB, most=200, rounds=1, vision_reps=5)


def bandwidth(nbytes: int, messages: int, run_round: Callable[[], float], rounds: int) -> dict:
    """Median over rounds of one timed burst of `messages` transfers: a single burst of a fraction
    of a second is at the mercy of whatever else the 2 cores are doing."""
    seconds = [run_round() for _ in range(rounds)]
    median = statistics.median(seconds)
    return {"messages": messages, "total_bytes": nbytes * messages, "seconds": median,
            "gb_per_s": nbytes * messages / median / 1e9,
            "rounds_gb_per_s": [nbytes * messages / s / 1e9 for s in seconds]}


def time_calls(call: Callable[[], object], reps: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return times


def stream_count(nbytes: int, target_bytes: int, most: int) -> int:
    """Enough messages to move about target_bytes: small payloads would otherwise finish in
    microseconds and time only the clock."""
    return max(4, min(most, target_bytes // nbytes))


def png(seed: int, size: int = 224) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


# --- memcpy baseline ---------------------------------------------------------------------------


def copy_burst(src: torch.Tensor, dst: torch.Tensor, count: int) -> float:
    t0 = time.perf_counter()
    for _ in range(count):
        dst.copy_(src)
    return time.perf_counter() - t0


def bench_memcpy(nbytes_list: list[int], plan: Plan) -> dict[int, dict]:
    out = {}
    for nbytes in nbytes_list:
        src = embeddings_of_size(nbytes)
        dst = torch.empty_like(src)
        size = src.numel() * src.element_size()
        count = stream_count(size, plan.target_bytes, 10_000)
        lat = latency_stats(time_calls(lambda s=src, d=dst: d.copy_(s), plan.reps))
        out[nbytes] = {"latency": lat,
                       "bandwidth": bandwidth(size, count, lambda s=src, d=dst, c=count: copy_burst(s, d, c),
                                              plan.rounds)}
    return out


# --- zmq: EmbeddingSender here, EmbeddingInbox in a spawned child -----------------------------


def run_inbox_child(ack_address: str, addresses: Queue, stop: Event) -> None:
    """The LM replica's side. The ack socket is only ever used from the inbox thread."""
    torch.set_num_threads(1)
    context = zmq.Context()
    ack = context.socket(zmq.PUSH)
    ack.setsockopt(zmq.LINGER, 0)
    ack.connect(ack_address)

    def on_embeddings(header, tensor: torch.Tensor) -> None:
        if header.content_hash:  # the bench's "ack" or an image key from VisionEncoder
            ack.send(msgspec.msgpack.encode([header.request_id, tensor.numel() * tensor.element_size()]))

    def on_error(error) -> None:
        ack.send(msgspec.msgpack.encode([error.request_id, -1]))

    inbox = EmbeddingInbox(on_embeddings, on_error, host="127.0.0.1", context=context)
    addresses.put(inbox.address)
    stop.wait()
    inbox.close()


class ZmqPath:
    """This process's sender, the child's inbox, and the ack socket between them."""

    def __init__(self) -> None:
        spawn = mp.get_context("spawn")
        self.acks = zmq.Context.instance().socket(zmq.PULL)
        ack_address = f"tcp://127.0.0.1:{self.acks.bind_to_random_port('tcp://127.0.0.1')}"
        self._stop = spawn.Event()
        addresses = spawn.Queue()
        self._child = spawn.Process(target=run_inbox_child, args=(ack_address, addresses, self._stop), daemon=True)
        self._child.start()
        self.address = addresses.get(timeout=120)
        self.sender = EmbeddingSender("bench")

    def wait_ack(self, expected_bytes: int | None = None) -> str:
        request_id, nbytes = msgspec.msgpack.decode(self.acks.recv())
        if expected_bytes is not None and nbytes != expected_bytes:
            raise RuntimeError(f"inbox got {nbytes} bytes, expected {expected_bytes}")
        return request_id

    def round_trip(self, tensor: torch.Tensor) -> None:
        self.sender.send_embeddings(self.address, "lat", 0, ACK, tensor)
        self.wait_ack(tensor.numel() * tensor.element_size())

    def stream(self, tensor: torch.Tensor, count: int) -> float:
        t0 = time.perf_counter()
        for i in range(count):
            self.sender.send_embeddings(self.address, "bw", i, ACK if i == count - 1 else "", tensor)
        self.wait_ack(tensor.numel() * tensor.element_size())
        return time.perf_counter() - t0

    def close(self) -> None:
        self.sender.close()
        self._stop.set()
        self._child.join(timeout=10)
        self.acks.close()


def bench_zmq(path: ZmqPath, nbytes_list: list[int], plan: Plan) -> dict:
    tiny = torch.zeros(1)
    small_rtt = latency_stats(time_calls(lambda: path.round_trip(tiny), max(plan.reps, 20), warmup=5))
    out: dict = {"small_message_round_trip": small_rtt, "sizes": {}}
    for nbytes in nbytes_list:
        tensor = embeddings_of_size(nbytes)
        size = tensor.numel() * tensor.element_size()
        lat = latency_stats(time_calls(lambda t=tensor: path.round_trip(t), plan.reps))
        lat["one_way_estimate_median_s"] = lat["median_s"] - small_rtt["median_s"] / 2
        count = stream_count(size, plan.target_bytes, plan.most)
        path.stream(tensor, min(count, 4))  # warm-up: socket buffers at this size
        out["sizes"][nbytes] = {"latency": lat, "bandwidth": bandwidth(
            size, count, lambda t=tensor, c=count: path.stream(t, c), plan.rounds)}
    return out


# --- ray: a plain actor returns the tensor -----------------------------------------------------


@ray.remote(num_cpus=0)
class EmbeddingSource:
    """Holds one tensor per size and returns it, as a vision deployment would return embeddings."""

    def __init__(self, nbytes_list: list[int]) -> None:
        torch.set_num_threads(1)
        self.tensors = {n: embeddings_of_size(n) for n in nbytes_list}

    def embeddings(self, nbytes: int, as_numpy: bool) -> torch.Tensor | np.ndarray:
        # A numpy array is Ray's fast case: one copy into the object store, read back without a
        # copy. A torch tensor goes through torch's own pickling (more copies) unless Ray's
        # zero-copy tensor option is on.
        tensor = self.tensors[nbytes]
        return tensor.numpy() if as_numpy else tensor


def _nbytes(result: torch.Tensor | np.ndarray) -> int:
    return result.nbytes if isinstance(result, np.ndarray) else result.numel() * result.element_size()


def ray_burst(source, nbytes: int, count: int, as_numpy: bool) -> float:
    """`count` calls in flight together; time until every result is in this process."""
    t0 = time.perf_counter()
    results = ray.get([source.embeddings.remote(nbytes, as_numpy) for _ in range(count)])
    seconds = time.perf_counter() - t0
    if len({_nbytes(r) for r in results}) != 1:
        raise RuntimeError(f"ray returned results of different sizes at {nbytes}")
    return seconds  # dropping `results` here frees the object store before the next round


def bench_ray(source, nbytes_list: list[int], plan: Plan, as_numpy: bool) -> dict:
    out = {}
    for nbytes in nbytes_list:
        size = _nbytes(ray.get(source.embeddings.remote(nbytes, as_numpy)))
        lat = latency_stats(time_calls(lambda n=nbytes: ray.get(source.embeddings.remote(n, as_numpy)), plan.reps))
        count = stream_count(size, plan.target_bytes, plan.most)
        out[nbytes] = {"latency": lat, "bandwidth": bandwidth(
            size, count, lambda n=nbytes, c=count: ray_burst(source, n, c, as_numpy), plan.rounds)}
    return out


def bench_ray_both(nbytes_list: list[int], plan: Plan) -> dict:
    # address="local": always a private instance, never a cluster someone else started on this
    # machine (`ray.init()` would join one found through /tmp/ray/ray_current_cluster).
    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        source = EmbeddingSource.remote(nbytes_list)
        return {"tensor": bench_ray(source, nbytes_list, plan, as_numpy=False),
                "numpy": bench_ray(source, nbytes_list, plan, as_numpy=True)}
    finally:
        ray.shutdown()


# --- vision encoder images/s -------------------------------------------------------------------


def bench_tower(model_dir: Path, batch_sizes: list[int], reps: int) -> list[dict]:
    tower = load_vision(model_dir, load_model_config(model_dir))
    processor = load_processor_config(model_dir)
    images = [decode_image(png(seed)) for seed in range(max(batch_sizes))]
    rows = []
    for b in batch_sizes:
        pixels, grids = preprocess_batch(images[:b], processor)
        with torch.inference_mode():
            times = time_calls(lambda p=pixels, g=grids: tower(p, g), reps)
        lat = latency_stats(times)
        rows.append({"batch": b, "patches": int(pixels.shape[0]), "latency": lat,
                     "images_per_s": b / lat["median_s"]})
    return rows


def bench_encode_path(model_dir: Path, path: ZmqPath, batch_sizes: list[int], reps: int) -> list[dict]:
    """VisionEncoder.encode with B fresh images per call, into the child's inbox."""
    encoder = VisionEncoder(model_dir, VisionConfig(), "bench-vision", sender=path.sender)
    loop = asyncio.new_event_loop()
    seed = 10_000  # fresh images on every call: a cache hit would skip the work being timed
    rows = []
    for b in batch_sizes:
        times = []
        batches_before = len(encoder._batcher.batch_sizes)  # read only, to report how calls were batched
        for rep in range(reps + 1):  # the first call is a warm-up
            data = [png(seed + i) for i in range(b)]
            seed += b
            inputs = [ImageInput(d, placeholder_count(224, 224, encoder.processor),
                                 image_key(d, encoder.processor, model_dir, "float32")) for d in data]
            request_id = f"enc-{b}-{rep}"
            t0 = time.perf_counter()
            if loop.run_until_complete(encoder.encode(request_id, inputs, path.address)) != b:
                raise RuntimeError(f"encode failed for some of {b} images")
            for _ in range(b):
                path.wait_ack()
            if rep:
                times.append(time.perf_counter() - t0)
            encoder.release(request_id)
        lat = latency_stats(times)
        rows.append({"images_per_call": b, "calls": reps + 1, "latency": lat, "images_per_s": b / lat["median_s"],
                     "tower_batch_sizes": encoder._batcher.batch_sizes[batches_before:]})
    task = encoder._batcher._task
    if task is not None:
        task.cancel()
        loop.run_until_complete(asyncio.gather(task, return_exceptions=True))
    loop.close()
    return rows


# --- report ------------------------------------------------------------------------------------


def combine(sizes: list[int], memcpy: dict, zmq_result: dict, ray_result: dict) -> list[dict]:
    """Per size: every path's numbers and zmq's ratios to each (GB/s ratio > 1 and ms ratio < 1: zmq wins)."""
    rows = []
    for n in sizes:
        z = zmq_result["sizes"][n]
        row = {"nominal_bytes": n, "bytes": z["bandwidth"]["total_bytes"] // z["bandwidth"]["messages"],
               "shape": [max(1, n // (4 * HIDDEN)), HIDDEN], "zmq": z, "memcpy": memcpy[n],
               "ray": ray_result["tensor"][n], "ray_numpy": ray_result["numpy"][n]}
        for other in ("memcpy", "ray", "ray_numpy"):
            row[f"zmq_over_{other}_bandwidth"] = z["bandwidth"]["gb_per_s"] / row[other]["bandwidth"]["gb_per_s"]
            row[f"zmq_over_{other}_latency"] = z["latency"]["median_s"] / row[other]["latency"]["median_s"]
        rows.append(row)
    return rows


def versions() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
            "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(), "msgspec": msgspec.__version__}


def _size_label(nbytes: int) -> str:
    return f"{nbytes // MIB} MiB" if nbytes >= MIB else f"{nbytes // KIB} KiB"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}" if seconds < 0.01 else f"{seconds * 1e3:.1f}"


def table(report: dict) -> str:
    paths = ("zmq", "memcpy", "ray", "ray_numpy")
    ratios = [f"zmq/{p} GB/s" for p in paths[1:]] + [f"zmq/{p} ms" for p in paths[1:]]
    lines = ["| size (bytes) | " + " | ".join([f"{p} ms | {p} GB/s" for p in paths] + ratios) + " |",
             "|---" * 15 + "|"]
    for row in report["transfer"]:
        cells = [f"{_size_label(row['nominal_bytes'])} ({row['bytes']:,})"]
        for p in paths:
            cells += [_ms(row[p]["latency"]["median_s"]), f"{row[p]['bandwidth']['gb_per_s']:.2f}"]
        cells += [f"{row[f'zmq_over_{o}_bandwidth']:.2f}x" for o in paths[1:]]
        cells += [f"{row[f'zmq_over_{o}_latency']:.2f}x" for o in paths[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| batch | patches | tower ms | tower images/s | encode path ms | encode path images/s | "
              "tower runs per call |", "|---|---|---|---|---|---|---|"]
    for tower, enc in zip(report["vision"]["tower"], report["vision"]["encode_path"], strict=True):
        lines.append(f"| {tower['batch']} | {tower['patches']} | {_ms(tower['latency']['median_s'])} | "
                     f"{tower['images_per_s']:.0f} | {_ms(enc['latency']['median_s'])} | "
                     f"{enc['images_per_s']:.0f} | {_batches(enc)} |")
    return "\n".join(lines)


def _batches(row: dict) -> str:
    """Tower runs per encode call and the largest batch: the batcher waits only max_wait_s for
    company, so B images of one call may be split over several tower runs."""
    sizes = row["tower_batch_sizes"]
    return f"{len(sizes) / row['calls']:.1f} (largest {max(sizes)})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="sizes up to 16 MiB, few repetitions: a smoke run")
    ap.add_argument("--model", type=Path, default=None, help="checkpoint dir (default: build the tiny preset)")
    ap.add_argument("--vision-threads", type=int, default=2, help="torch threads for the vision encoder")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "vision_transport.json")
    args = ap.parse_args()
    load_before = os.getloadavg()  # other work on a shared 2-core box skews everything (kept in the JSON)
    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    plan = QUICK if args.quick else FULL
    model_dir = args.model or make_checkpoint(ROOT / "checkpoints" / "bench-tiny", "tiny", seed=0)

    torch.set_num_threads(1)  # memcpy on one thread: the baseline is one core's copy, not a parallel one
    memcpy = bench_memcpy(sizes, plan)
    print("memcpy done", file=sys.stderr)
    path = ZmqPath()
    try:
        zmq_result = bench_zmq(path, sizes, plan)
        print("zmq done", file=sys.stderr)
        torch.set_num_threads(args.vision_threads)
        vision = {"model_dir": str(model_dir), "image_size": [224, 224], "threads": args.vision_threads,
                  "tower": bench_tower(model_dir, BATCH_SIZES, plan.vision_reps),
                  "encode_path": bench_encode_path(model_dir, path, BATCH_SIZES, plan.vision_reps)}
        print("vision done", file=sys.stderr)
    finally:
        path.close()
    # Ray last: its daemons keep a core busy for a while around start and shutdown, which would
    # skew the CPU-bound vision timings.
    torch.set_num_threads(1)
    ray_result = bench_ray_both(sizes, plan)
    print("ray done", file=sys.stderr)

    report = {
        "command": " ".join([sys.executable, *sys.argv]),
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": versions(),
        "machine": {"arch": platform.machine(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "load_average_before": load_before, "load_average_after": os.getloadavg()},
        "args": {k: str(v) for k, v in vars(args).items()},
        "plan": asdict(plan),
        "hidden": HIDDEN,
        "methods": {
            "zmq": "EmbeddingSender (this process) -> EmbeddingInbox (spawned child); latency = round trip "
                   "(payload there, small ack back); one_way_estimate = round trip - small round trip / 2",
            "memcpy": "dst.copy_(src), preallocated, 1 torch thread",
            "ray": "plain Ray actor method returning a torch tensor (default serializer); latency = ray.get "
                   "of one call (small call there, payload back); bandwidth = N calls in flight",
            "bandwidth": "median over plan.rounds bursts of `messages` transfers; GB = 1e9 bytes",
            "ray_numpy": "the same actor returning tensor.numpy(): one copy into the object store, read back "
                         "without a copy",
            "ray_zero_copy_torch_tensors": os.environ.get("RAY_ENABLE_ZERO_COPY_TORCH_TENSORS", "unset"),
        },
        "zmq_small_message_round_trip": zmq_result["small_message_round_trip"],
        "transfer": combine(sizes, memcpy, zmq_result, ray_result),
        "vision": vision,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(table(report))


if __name__ == "__main__":
    main()
