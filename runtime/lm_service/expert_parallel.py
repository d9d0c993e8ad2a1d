"""Expert parallelism: E ranks share a model's routed experts; rank r holds only its 1/E of them.

Rank 0 lives in the engine's process and runs everything else (embeddings, attention, dense
layers, shared experts, the gate). Ranks 1..E-1 are worker processes that hold only their routed
experts. Per forward, rank 0 announces the token count; then in every MoE layer it broadcasts
the hidden states with their routing (expert ids and weights), every rank applies its own experts
(contributing zeros when none of the tokens picked them), and a sum-reduce brings the partial
outputs back to rank 0. Every rank takes part in every collective of every forward, so an idle rank
can never leave the group waiting. Collectives have a timeout: a dead rank fails the forward
instead of hanging it.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import multiprocessing as mp
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from runtime.errors import CheckpointError
from runtime.lm_service.allocator import keep_freed_memory
from runtime.models.deepseek_v3 import DeepseekV3LM, MoE
from runtime.models.experts import ExpertBank

log = logging.getLogger(__name__)

STOP, FORWARD, LOAD, DROP = 0, 1, 2, 3  # the first header field of each round
_TEXT_WIDTH = 512  # bytes of an error message gathered from each rank


def expert_range(n_experts: int, size: int, rank: int) -> tuple[int, int]:
    """(first, count) of the experts rank owns; the first n % size ranks take one more."""
    if size > n_experts:
        raise ValueError(f"EP size {size} exceeds the {n_experts} routed experts")
    base, extra = divmod(n_experts, size)
    first = rank * base + min(rank, extra)
    return first, base + (1 if rank < extra else 0)


@dataclass(frozen=True)
class RankSpec:
    """Everything a worker rank needs, picklable (spawned processes and Ray actors take it)."""

    model_dir: str
    rank: int
    size: int
    host: str
    port: int
    dtype: str
    device: str
    timeout_s: float
    threads: int


class RankHandle(Protocol):
    """A running worker rank, however it was started (a local process, a Ray actor)."""

    def join(self, timeout: float | None = None) -> None: ...
    def is_alive(self) -> bool: ...
    def terminate(self) -> None: ...


RankLauncher = Callable[[RankSpec], RankHandle]


def spawn_process(spec: RankSpec) -> RankHandle:
    """The default launcher: a spawned child process of this one (so on this node by construction)."""
    proc = mp.get_context("spawn").Process(target=run_worker_rank, args=(spec,), daemon=True,
                                           name=f"ep-rank-{spec.rank}")
    proc.start()
    return proc


class _Collectives:
    """The group's few collectives. Gloo moves CPU tensors; NCCL moves tensors on each rank's GPU."""

    def __init__(self, store: dist.Store, rank: int, size: int, device: str, timeout_s: float):
        timeout = datetime.timedelta(seconds=timeout_s)
        self.nccl = device.startswith("cuda") and torch.cuda.device_count() >= size
        self.comm_device = torch.device(f"cuda:{rank}") if self.nccl else torch.device("cpu")
        # The backends' stubs lack the collectives; they exist at run time.
        self.pg: Any = (dist.ProcessGroupNCCL(store, rank, size, dist.ProcessGroupNCCL.Options())
                        if self.nccl else dist.ProcessGroupGloo(store, rank, size, timeout))

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to(self.comm_device)
        self.pg.broadcast(t, 0).wait()
        return t

    def reduce_to_rank0(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to(self.comm_device)
        self.pg.reduce(t, 0).wait()
        return t

    def allgather_text(self, text: str, size: int) -> list[str]:
        """Each rank's short text (its first _TEXT_WIDTH bytes), rank 0 first."""
        data = torch.zeros(_TEXT_WIDTH, dtype=torch.long)
        raw = text.encode()[:_TEXT_WIDTH]
        data[: len(raw)] = torch.tensor(list(raw), dtype=torch.long)
        out = [torch.zeros(_TEXT_WIDTH, dtype=torch.long, device=self.comm_device) for _ in range(size)]
        self.pg.allgather([out], [data.to(self.comm_device)]).wait()
        return [bytes(v for v in t.tolist() if v).decode(errors="replace") for t in out]

    def allgather_ints(self, value: int, size: int) -> list[int]:
        out = [torch.zeros(1, dtype=torch.long, device=self.comm_device) for _ in range(size)]
        self.pg.allgather([out], [torch.tensor([value], device=self.comm_device)]).wait()
        return [int(t.item()) for t in out]


def _payload(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """One float32 tensor [T, hidden + 2k]: states, routing weights, expert ids (exact below 2^24)."""
    return torch.cat([x.float(), weights.float(), ids.float()], dim=1)


def _unpack(payload: torch.Tensor, hidden: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x, weights, ids = payload.split([hidden, k, k], dim=1)
    return x, ids.long(), weights


def _bytes(experts: list[ExpertBank]) -> int:
    return sum(e.resident_bytes() for e in experts)


class ExpertGroup:
    """Rank 0's side: the MoE layers' dispatch, and the handle on the worker ranks."""

    def __init__(self, comm: _Collectives, workers: list[RankHandle], lm: nn.Module):
        self.comm, self.workers = comm, workers
        local = attach(lm, self)
        self.rank_expert_bytes = comm.allgather_ints(_bytes(local), len(workers) + 1)
        self.rank_pids = comm.allgather_ints(os.getpid(), len(workers) + 1)  # for operators (and fault tests)
        self.closed = False

    @classmethod
    def start(cls, model_dir: str, size: int, dtype: str, device: str, timeout_s: float, threads: int,
              load_local: Callable[[tuple[int, int]], DeepseekV3LM], n_experts: int,
              host: str = "127.0.0.1", launch: RankLauncher = spawn_process) -> tuple[DeepseekV3LM, ExpertGroup]:
        """Launch ranks 1..size-1 and join them; load rank 0's model with its own expert range
        (load_local) and route its MoE layers through the group. The ranks must run on this node
        (the store listens on `host`): the launcher guarantees it."""
        store = dist.TCPStore(host, 0, size, True, datetime.timedelta(seconds=timeout_s), wait_for_workers=False)
        workers = [launch(RankSpec(str(model_dir), rank, size, host, store.port, dtype, device, timeout_s, threads))
                   for rank in range(1, size)]
        comm = _Collectives(store, 0, size, device, timeout_s)
        lm = load_local(expert_range(n_experts, size, 0))
        return lm, cls(comm, workers, lm)

    def begin_forward(self, num_tokens: int) -> None:
        self.comm.broadcast(torch.tensor([FORWARD, num_tokens], dtype=torch.long))

    def dispatch(self, experts: ExpertBank, x: torch.Tensor, ids: torch.Tensor,
                 weights: torch.Tensor) -> torch.Tensor:
        self.comm.broadcast(_payload(x, ids, weights))
        partial = experts(x, ids, weights).float()
        return self.comm.reduce_to_rank0(partial).to(x.device, x.dtype)

    def reload(self, model_dir: str, load_local: Callable[[tuple[int, int]], DeepseekV3LM],
               n_experts: int) -> DeepseekV3LM:
        """New weights from `model_dir` on every rank, swapped in two phases: each rank reads and checks
        its part (rank 0 all but the other ranks' experts) next to its old one; only if every rank
        succeeded do all swap, else all keep the old weights and the error names the rank."""
        size = len(self.workers) + 1
        path = torch.tensor(list(model_dir.encode()), dtype=torch.long)
        self.comm.broadcast(torch.tensor([LOAD, len(path)], dtype=torch.long))
        self.comm.broadcast(path)
        lm: DeepseekV3LM | None = None
        failure: BaseException | None = None
        try:
            lm = load_local(expert_range(n_experts, size, 0))
        except Exception as e:  # the other ranks still wait for this round's verdict
            log.exception("expert-parallel rank 0 could not load %s", model_dir)
            failure = e
        errors = self.comm.allgather_text("" if failure is None else f"{type(failure).__name__}: {failure}", size)
        commit = all(not e for e in errors)
        self.comm.broadcast(torch.tensor([int(commit), 0], dtype=torch.long))
        if failure is not None:
            raise failure
        if not commit or lm is None:
            rank = next(r for r, e in enumerate(errors) if e)
            raise CheckpointError(f"expert-parallel rank {rank} could not load its experts: {errors[rank]}")
        attach(lm, self)
        return lm

    def drop(self) -> None:
        """Every worker rank frees its experts (the engine sleeps at level 2; reload brings them back)."""
        self.comm.broadcast(torch.tensor([DROP, 0], dtype=torch.long))

    def expert_bytes(self) -> list[int]:
        """Resident routed-expert bytes of each rank, rank 0 first."""
        return list(self.rank_expert_bytes)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(RuntimeError):  # a rank already gone is terminated below
            self.comm.broadcast(torch.tensor([STOP, 0], dtype=torch.long))
        for proc in self.workers:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()


def attach(lm: nn.Module, group: ExpertGroup) -> list[ExpertBank]:
    """Route every MoE layer of rank 0's model through the group; return its local experts."""
    local = []
    for module in lm.modules():
        if isinstance(module, MoE):
            module.dispatch = group.dispatch
            local.append(module.experts)
    return local


def run_worker_rank(spec: RankSpec) -> None:
    """Entry point of ranks 1..E-1: load this rank's experts, then serve forwards until STOP."""
    from runtime.checkpoint.loader import load_routed_experts
    from runtime.models.common import DTYPES
    from runtime.models.config import load_model_config

    torch.set_num_threads(spec.threads)
    keep_freed_memory()
    cfg = load_model_config(spec.model_dir)
    store = dist.TCPStore(spec.host, spec.port, spec.size, False, datetime.timedelta(seconds=spec.timeout_s))
    comm = _Collectives(store, spec.rank, spec.size, spec.device, spec.timeout_s)
    device = str(comm.comm_device) if comm.nccl else spec.device
    owned = expert_range(cfg.text.n_routed_experts, spec.size, spec.rank)
    layers = list(load_routed_experts(spec.model_dir, cfg, owned, DTYPES[spec.dtype], device).values())
    comm.allgather_ints(_bytes(layers), spec.size)
    comm.allgather_ints(os.getpid(), spec.size)

    def reload(path: str) -> list[ExpertBank]:
        return list(load_routed_experts(path, cfg, owned, DTYPES[spec.dtype], device).values())

    _serve(comm, layers, cfg.text.hidden_size, cfg.text.num_experts_per_tok, DTYPES[spec.dtype], device, reload,
           spec.size)


@torch.inference_mode()
def _serve(comm: _Collectives, layers: list[ExpertBank], hidden: int, k: int, dtype: torch.dtype,
           device: str, reload: Callable[[str], list[ExpertBank]], size: int) -> None:
    while True:
        header = comm.broadcast(torch.zeros(2, dtype=torch.long))
        op, num_tokens = (int(v) for v in header.tolist())
        if op == STOP:
            return
        if op == LOAD:
            layers = _reload(comm, layers, num_tokens, reload, size)
            continue
        if op == DROP:
            layers = [experts.to("meta") for experts in layers]
            continue
        for experts in layers:
            payload = comm.broadcast(torch.empty(num_tokens, hidden + 2 * k))
            x, ids, weights = _unpack(payload.to(device), hidden, k)
            comm.reduce_to_rank0(experts(x.to(dtype), ids, weights).float())


def _reload(comm: _Collectives, layers: list[ExpertBank], path_len: int, reload: Callable[[str], list[ExpertBank]],
            size: int) -> list[ExpertBank]:
    """A worker's side of ExpertGroup.reload: read its experts, report, swap only on rank 0's verdict."""
    path = bytes(comm.broadcast(torch.zeros(path_len, dtype=torch.long)).tolist()).decode()
    new: list[ExpertBank] | None = None
    error = ""
    try:
        new = reload(path)
    except Exception as e:  # rank 0 hears it, names this rank, and every rank keeps its old weights
        log.exception("an expert-parallel rank could not load %s", path)
        error = f"{type(e).__name__}: {e}"
    comm.allgather_text(error, size)
    commit = int(comm.broadcast(torch.zeros(2, dtype=torch.long))[0])
    return new if commit and new is not None else layers
