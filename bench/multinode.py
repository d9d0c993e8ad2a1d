"""Vision on another node vs on the LM's node: embedding transfer over a veth pair vs loopback, and
TTFT with the vision pool remote vs local, in one run (root: it makes a network namespace).

    sudo .venv/bin/python bench/multinode.py [--quick] [--out bench/results/multinode.json]

The two hosts are those of tests/multinode (tests/multinode/cluster.py): the head in the root
network namespace, a second node in a namespace of its own, one veth pair between them.

- transfer: `runtime.transport.EmbeddingSender` in this process pushes embeddings of the real
  model's size (bf16 [tokens, 7168], tokens = the placeholder count of a 224x224 and a 1024x1024
  image) to an `EmbeddingInbox` in a child process, which acks each message over a second ZMQ
  socket: over loopback (child in this namespace, 127.0.0.1) and over the veth (child in the other
  namespace, 10.77.x.2). Bandwidth: a burst of messages back to back, only the last acked, total
  bytes / time to that ack, median of rounds. Latency: one message and its ack, median and p90.
- ttft: the app from deploy/multinode.yaml on the two Ray nodes, streamed requests one at a time
  (`runtime.benchmark`, 16 words + one fresh image, 4 tokens), with the vision pool on the other node
  (placement vision_host) and then on the LM's node (placement lm_host; only VisionService
  restarts). Each configuration uses images of its own seed, so no cache (vision or prefix) helps.
  The tiny checkpoint's embeddings are small (hidden 64) and its processor caps an image at 256
  patches: TTFT differs by the cross-node handle call and the ZMQ hop, not by the bytes of a real
  model's embeddings (those are the transfer figures).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import torch
import zmq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runtime.transport import EmbeddingInbox, EmbeddingSender  # noqa: E402

HIDDEN = 7168  # the real model's hidden size: what one image token's embedding holds
SIZES = (224, 1024)


def image_tokens(side: int) -> int:
    """Image tokens of a side x side image under the release's processor settings (the defaults)."""
    from runtime.images import ProcessorConfig, placeholder_count

    return placeholder_count(side, side, ProcessorConfig())


# --- transfer ------------------------------------------------------------------------------------


def inbox_child(host: str, ack_address: str) -> None:
    """The LM replica's side, in a child process: print the inbox address, ack each message."""
    context = zmq.Context()
    ack = context.socket(zmq.PUSH)
    ack.connect(ack_address)
    inbox = EmbeddingInbox(lambda h, t: ack.send(msgspec.msgpack.encode(h.request_id)),
                           lambda e: ack.send(msgspec.msgpack.encode(e.request_id)), host, context)
    print(inbox.address, flush=True)
    sys.stdin.read()  # until the parent closes it
    inbox.close()


class Transfer:
    def __init__(self, sender_host: str, inbox_host: str, namespace: str | None):
        self.acks = zmq.Context.instance().socket(zmq.PULL)
        ack_address = f"tcp://{sender_host}:{self.acks.bind_to_random_port(f'tcp://{sender_host}')}"
        command = [sys.executable, __file__, "--inbox", inbox_host, ack_address]
        if namespace is not None:
            command = ["ip", "netns", "exec", namespace, *command]
        self.child = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                      env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert self.child.stdout is not None
        self.address = self.child.stdout.readline().strip()
        self.sender = EmbeddingSender("bench")

    def send(self, tensor: torch.Tensor, count: int) -> float:
        """Seconds from the first send to the last message's ack."""
        start = time.perf_counter()
        for i in range(count):
            self.sender.send_embeddings(self.address, f"{i}", 0, "h", tensor)
        while msgspec.msgpack.decode(self.acks.recv()) != f"{count - 1}":
            pass
        return time.perf_counter() - start

    def close(self) -> None:
        self.sender.close()
        assert self.child.stdin is not None
        self.child.stdin.close()
        self.child.wait(timeout=30)
        self.acks.close()


def measure_transfer(path: Transfer, tokens: int, reps: int, rounds: int) -> dict:
    tensor = torch.randn(tokens, HIDDEN).to(torch.bfloat16)
    nbytes = tensor.numel() * tensor.element_size()
    burst = max(4, min(200, 400_000_000 // nbytes))
    path.send(tensor, 2)  # connect and warm up
    latency = sorted(path.send(tensor, 1) for _ in range(reps))
    seconds = [path.send(tensor, burst) for _ in range(rounds)]
    return {"tokens": tokens, "bytes": nbytes, "latency_ms_p50": statistics.median(latency) * 1e3,
            "latency_ms_p90": latency[int(0.9 * (len(latency) - 1))] * 1e3, "burst_messages": burst,
            "bytes_per_s": nbytes * burst / statistics.median(seconds),
            "rounds_bytes_per_s": [nbytes * burst / s for s in seconds]}


def bench_transfer(hosts, quick: bool) -> dict:
    reps, rounds = (5, 2) if quick else (20, 5)
    out: dict = {}
    for wire, (sender, inbox, namespace) in {"loopback": ("127.0.0.1", "127.0.0.1", None),
                                             "veth": (hosts.head.address, hosts.vision.address,
                                                      hosts.namespace)}.items():
        path = Transfer(sender, inbox, namespace)
        try:
            out[wire] = {f"{side}x{side}": measure_transfer(path, image_tokens(side), reps, rounds) for side in SIZES}
        finally:
            path.close()
    return out


# --- TTFT --------------------------------------------------------------------------------------


def bench_ttft(hosts, port: int, work: str, quick: bool) -> dict:
    from runtime.benchmark.serve_bench import run_benchmark
    from runtime.benchmark.workload import WorkloadSpec
    from runtime.checkpoint.maker import make_checkpoint
    from tests.multinode.conftest import MultiNodeApp

    model = make_checkpoint(Path(work) / "tiny", "tiny", seed=0)
    app = MultiNodeApp(hosts, model, port)
    counts = {224: 6 if quick else 30, 1024: 3 if quick else 12}
    out: dict = {}
    for seed, (where, resource) in enumerate([("remote", "vision_host"), ("local", "lm_host")], start=1):
        app.apply(app.configure({"placement": {"vision": {resource: 0.01}}}))
        nodes = sorted({s["address"].rsplit(":", 1)[0] for s in app.stats()["vision"].values()})
        out[where] = {"vision_addresses": nodes}
        for side, n in counts.items():
            warm = WorkloadSpec(num_requests=2, input_len=16, output_len=4, image_width=side, image_height=side,
                                seed=100 * seed + side)
            run_benchmark(app.base_url, warm, concurrency=1)
            spec = WorkloadSpec(num_requests=n, input_len=16, output_len=4, image_width=side, image_height=side,
                                seed=10 * seed + side)
            summary, _ = run_benchmark(app.base_url, spec, concurrency=1)
            out[where][f"{side}x{side}"] = {"requests": n, "failed": summary.get("failed"),
                                            "ttft_ms": summary["ttft_ms"]}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "multinode.json"))
    parser.add_argument("--inbox", nargs=2, metavar=("HOST", "ACK_ADDRESS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inbox:
        inbox_child(*args.inbox)
        return 0

    from runtime.router import launch
    from tests.e2e.serve_app import free_port
    from tests.multinode.cluster import TwoHosts, unavailable

    reason = unavailable()
    if reason:
        print(f"two hosts need network namespaces: {reason}", file=sys.stderr)
        return 2
    hosts, port = TwoHosts(), free_port()
    hosts.env.update(launch.ray_environment({"http_options": {"host": hosts.head.address, "port": port}}))
    result: dict = {"time": datetime.now(UTC).isoformat(timespec="seconds"), "machine": platform.platform(),
                    "cpus": os.cpu_count(), "embedding": f"bfloat16 [tokens, {HIDDEN}]",
                    "load_average_before": os.getloadavg()}
    try:
        hosts.make_network()
        result["transfer"] = bench_transfer(hosts, args.quick)
        print(json.dumps(result["transfer"], indent=1))
        hosts.start_head()
        hosts.start_vision_node()
        hosts.connect()
        hosts.wait_nodes(2)
        with tempfile.TemporaryDirectory(prefix="kmn-bench-") as work:
            result["ttft"] = bench_ttft(hosts, port, work, args.quick)
    finally:
        import ray

        if ray.is_initialized():
            from ray import serve

            serve.shutdown()
            ray.shutdown()
        hosts.stop()
    result["load_average_after"] = os.getloadavg()
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["ttft"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
