"""Where every replica of an app posts its stats, so the router can show all of them.

A Serve handle reaches one replica per call, not each of them; so each LM and vision replica posts
its stats here every `period_s` from a reporter thread, and `/stats`, `/metrics` and `/health` read
the board. A report older than `max_age_s` means the replica is gone and is not shown.

The board lives exactly as long as its Serve app. It is a detached actor, so that no replica owns
it: a replica that dies or restarts (or a scale-down) does not take it from the others, and the
admin state it keeps survives them. It ends itself once Serve no longer has the app (`serve
shutdown`, `serve.delete`, a config without the app): every `APP_CHECK_PERIOD_S` it asks Serve.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

import ray

PERIOD_S = 0.25
# Asking Serve (serve.status) costs the controller and the board a few ms each time: at every
# second it was the board's largest cost and a tenth of the controller's under load.
APP_CHECK_PERIOD_S = 5.0


def app_running(app_name: str) -> bool | None:
    """Whether Serve still runs this app: False once it was deleted or Serve was shut down (its
    controller gone for good, and every app with it), None when Serve cannot say just now."""
    from ray import serve

    try:
        return app_name in serve.status().applications
    except ray.exceptions.ActorDiedError:
        return False
    except Exception:  # a controller restarting or busy: ask again next period
        return None


def wait_for_app_end(app_name: str, running: Callable[[str], bool | None] = app_running,
                     period_s: float = APP_CHECK_PERIOD_S) -> None:
    """Return once `running` says the app is gone (not while it cannot tell)."""
    while running(app_name) is not False:
        time.sleep(period_s)


def _end_this_actor_with_app(app_name: str) -> None:
    wait_for_app_end(app_name)
    ray.kill(ray.get_runtime_context().current_actor)


class StatsBoard:
    def __init__(self, app_name: str | None = None) -> None:
        """With app_name (as the app's board actor), it ends itself once Serve no longer has that app."""
        self._reports: dict[tuple[str, str], tuple[float, dict[str, Any]]] = {}
        # What the admin endpoints last made of the LM pool (runtime.router.admin): a replica that
        # starts later loads these weights; routers refuse requests (503) while the pool sleeps.
        self._admin: dict[str, Any] = {"weights_version": 0, "weights_path": None, "sleep_level": 0}
        if app_name is not None:
            threading.Thread(target=_end_this_actor_with_app, args=(app_name,), name="end-with-app",
                             daemon=True).start()

    def admin_state(self) -> dict[str, Any]:
        return dict(self._admin)

    def set_admin_state(self, changes: dict[str, Any]) -> None:
        self._admin.update(changes)

    def report(self, pool: str, replica: str, stats: dict[str, Any]) -> None:
        self._reports[(pool, replica)] = (time.monotonic(), stats)

    def snapshot(self, max_age_s: float = 3.0) -> dict[str, dict[str, dict[str, Any]]]:
        """{pool: {replica: stats}} of the replicas that reported recently."""
        now = time.monotonic()
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for (pool, replica), (at, stats) in list(self._reports.items()):
            if now - at > max_age_s:
                del self._reports[(pool, replica)]
            else:
                out.setdefault(pool, {})[replica] = stats
        return out


HEAD_NODE = "node:__internal_head__"  # the resource Ray gives the head node alone
_remote: Any = ray.remote
_StatsBoardActor: Any = _remote(num_cpus=0, max_concurrency=64)(StatsBoard)


def board(app_name: str) -> Any:
    """The app's board, created by whichever replica asks first. Detached: it outlives any one
    replica, and ends with the app (see the module's docstring). It lives on the head node (as
    Serve's controller does), not on the node of the replica that asked first: a board on a vision
    node would go with that node and leave every replica reporting to a dead actor."""
    return _StatsBoardActor.options(name=f"kimi-stats:{app_name}", namespace="kimi-runtime", get_if_exists=True,
                                    lifetime="detached", resources={HEAD_NODE: 0.001}).remote(app_name)


def rss_bytes(pid: int | None = None) -> int:
    """Resident memory of this process, or of `pid` (Linux /proc; 0 where unavailable)."""
    try:
        with open(f"/proc/{pid or 'self'}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class Reporter:
    """A daemon thread that posts `collect()` to the board every period (fire and forget)."""

    def __init__(self, pool: str, replica: str, app_name: str, collect: Callable[[], dict[str, Any]],
                 period_s: float = PERIOD_S):
        self.pool, self.replica, self.collect, self.period_s = pool, replica, collect, period_s
        self._board = board(app_name)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"{pool}-stats", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self._board.report.remote(self.pool, self.replica, self.collect())
            except Exception:  # a report is best effort; the next one may get through
                continue

    def close(self) -> None:
        self._stop.set()
