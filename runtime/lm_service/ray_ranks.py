"""Expert-parallel worker ranks as Ray actors, for LM replicas that run under Ray Serve.

Each rank is an actor in the replica's placement group (bundle `rank`, STRICT_PACK, so on the
replica's node; the group's TCP store listens there). Without a placement group the rank is
pinned to the replica's node. Ray then accounts for the ranks' CPUs/GPUs, and kills them with the
replica.
"""

from __future__ import annotations

from typing import Any

import ray
from ray.util import get_current_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from runtime.lm_service.expert_parallel import RankSpec, run_worker_rank


class _RankActor:
    def run(self, spec: RankSpec) -> None:
        run_worker_rank(spec)


_remote: Any = ray.remote
_RankActorClass: Any = _remote(max_restarts=0)(_RankActor)


class RayRank:
    """A RankHandle over a Ray actor running `run_worker_rank` until the group stops."""

    def __init__(self, spec: RankSpec, resources: dict[str, float]):
        pg = get_current_placement_group()
        if pg is not None and len(pg.bundle_specs) > spec.rank:
            strategy: Any = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=spec.rank)
        else:
            strategy = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.actor = _RankActorClass.options(
            num_cpus=resources.get("CPU", 0), num_gpus=resources.get("GPU", 0), scheduling_strategy=strategy,
            name=None, runtime_env={"env_vars": {"OMP_NUM_THREADS": str(spec.threads)}}).remote()
        self.done = self.actor.run.remote(spec)

    def join(self, timeout: float | None = None) -> None:
        ray.wait([self.done], timeout=timeout)

    def is_alive(self) -> bool:
        ready, _ = ray.wait([self.done], timeout=0)
        return not ready

    def terminate(self) -> None:
        ray.kill(self.actor)


def ray_launcher(resources: dict[str, float]):
    """A RankLauncher that starts each rank as a RayRank with these resources."""
    return lambda spec: RayRank(spec, resources)
