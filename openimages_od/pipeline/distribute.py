"""``oiod prepare`` on Ray: the only module that imports Ray.

The driver (:func:`run_prepare`) makes sure a plan exists, lists the shards
that are not committed yet (a committed shard has its ``.stats.json``; it is
skipped without any network request for its images), and hands them to a
pool of async download actors (:class:`ShardWorker`). Each actor runs
:func:`openimages_od.pipeline.shard.run_shard` for up to
``ray.max_shards_in_flight_per_actor`` shards at once, with
``ray.concurrency_per_actor`` image fetches in flight and
``ray.decode_threads_per_actor`` threads for decode/resize/encode.

Scaling: unless ``ray.num_actors`` overrides it, the number of actors follows
the cluster (:class:`ShardScheduler`): each alive node gets
``ray.actors_per_node`` actors (default: its CPUs / ``ray.num_cpus_per_actor``),
pinned to it, and nodes that join during the run get theirs and take shards.
A run with no usable node waits for one for up to ``ray.join_timeout_s``.

Fault tolerance: actors are created with ``max_restarts`` (a crashed process
comes back on its node); a shard whose actor died (or that raised, or ran past
``ray.shard_timeout_s``) is resubmitted by the driver, at most
``ray.max_shard_retries`` times. A node that is lost (dead in the GCS, or its
actors silent for ``ray.node_loss_timeout_s``) has its shards rescheduled on
the other nodes at once, without using a retry. Because a shard is only
visible once its stats are written and its bytes depend only on the plan and
the source bytes, a retried shard replaces nothing and duplicates nothing.

Work in flight is bounded (``ray.wait``). Progress comes with the heartbeats
the driver sends every actor (images done in its running shards), so nothing
but the driver has to survive for the live bar.

Secrets: nothing secret rides in a ``runtime_env``, an actor's constructor
arguments or a task's arguments (the Ray dashboard shows the first and can
show the others); workers read credentials from their own environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import socket
import sys
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

from openimages_od.config import Config, save_resolved
from openimages_od.errors import ConfigError, OiodError
from openimages_od.openimages.planio import PlanManifest, read_manifest
from openimages_od.pipeline.fetch import Fetcher
from openimages_od.pipeline.report import build_report
from openimages_od.pipeline.shard import CRASH_ENV, ShardContext, ShardTask, run_shard, shard_urls
from openimages_od.storage import ObjectNotFound, Storage

log = logging.getLogger(__name__)

__all__ = ["run_prepare", "ShardWorker", "ShardScheduler", "pending_tasks"]


# --------------------------------------------------------------------------- actors


class ShardWorker:
    """A download actor: one event loop, one HTTP pool, one S3 thread pool, shared by its shards."""

    def __init__(self, cfg_data: dict[str, Any], crash_once: Optional[str] = None) -> None:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        self.cfg = Config.model_validate(cfg_data)
        self.crash_once = crash_once
        self._ctx: Optional[ShardContext] = None
        # Images finished in the shards still running, per shard: (ok, failed, bytes).
        self._live: dict[str, list[int]] = {}
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    def _context(self) -> ShardContext:
        if self._ctx is None:
            rc = self.cfg.ray
            self._ctx = ShardContext(
                cfg=self.cfg,
                storage=Storage.from_config(self.cfg),
                fetcher=Fetcher(self.cfg.source.images, concurrency=rc.concurrency_per_actor,
                                storage=Storage.from_config(self.cfg)),
                cpu_pool=ThreadPoolExecutor(rc.decode_threads_per_actor, thread_name_prefix="oiod-cpu"),
                semaphore=asyncio.Semaphore(rc.concurrency_per_actor),
                crash_once=self.crash_once,
                worker=self.name,
            )
        return self._ctx

    async def ready(self) -> str:
        return self.name

    async def heartbeat(self) -> tuple[int, int, int]:
        """Liveness probe for the driver; returns (ok, failed, bytes) of the images done in running shards."""
        live = list(self._live.values())
        return sum(c[0] for c in live), sum(c[1] for c in live), sum(c[2] for c in live)

    async def run(self, task: ShardTask) -> dict[str, Any]:
        key = f"{task.name}#{time.monotonic_ns()}"  # a resubmitted shard may overlap its lost attempt
        counts = self._live[key] = [0, 0, 0]

        def on_image(ok: bool, nbytes: int) -> None:
            counts[0 if ok else 1] += 1
            counts[2] += nbytes

        try:
            return await run_shard(task, dataclasses.replace(self._context(), on_image=on_image))
        finally:
            self._live.pop(key, None)


# --------------------------------------------------------------------------- planning the work


def _ensure_plan(cfg: Config, storage: Storage, plan_url: str, skip_plan: bool) -> PlanManifest:
    manifest_url = f"{plan_url}/manifest.json"
    if not storage.exists(manifest_url):
        if skip_plan:
            raise OiodError(f"no plan at {manifest_url} (run `oiod plan` first, or drop --skip-plan)")
        try:
            from openimages_od.openimages.plan import run_plan
        except ImportError as exc:
            raise OiodError(f"no plan at {manifest_url} and the planner is not available ({exc})") from exc
        log.info("no plan at %s: planning first", manifest_url)
        run_plan(cfg)
    try:
        return read_manifest(storage, plan_url)
    except ObjectNotFound:
        raise OiodError(f"planning finished but {manifest_url} is missing") from None


def pending_tasks(
    cfg: Config, storage: Storage, manifest: PlanManifest, plan_url: str, retry_failed: bool = False
) -> tuple[list[ShardTask], dict[str, dict[str, Any]]]:
    """Shards still to do, and the stats of the committed ones (keyed by shard name).

    One listing per split decides what is committed, so a finished run costs a
    handful of requests. With ``retry_failed``, committed shards whose stats
    record failed images are redone (only their failed images are re-fetched).
    """
    wanted = set(cfg.selection.splits) or set(manifest.splits)
    tasks: list[ShardTask] = []
    committed: dict[str, dict[str, Any]] = {}
    for split in sorted(manifest.splits):
        if split not in wanted:
            continue
        sm = manifest.splits[split]
        prefix = cfg.output_path("tfrecords", split) + "/"
        existing = {o.url for o in storage.list(prefix)}
        for i, rel in enumerate(sm.shards):
            urls = shard_urls(cfg, split, i, sm.num_shards)
            plan_shard = f"{plan_url}/{rel}"
            task = ShardTask(split, i, sm.num_shards, plan_shard)
            if urls["stats"] in existing:
                stats = storage.read_json(urls["stats"])
                if retry_failed and stats.get("failed", 0) > 0:
                    tasks.append(ShardTask(split, i, sm.num_shards, plan_shard, retry_failed=True))
                else:
                    committed[task.name] = stats
            else:
                tasks.append(task)
    return tasks, committed


# --------------------------------------------------------------------------- Ray


def _ray() -> Any:
    try:
        import ray
    except ImportError as exc:  # pragma: no cover - ray is a base dependency
        raise OiodError("oiod prepare needs Ray: pip install 'ray[default]'") from exc
    return ray


@contextlib.contextmanager
def _dynamic_agent_port() -> Iterator[None]:
    """Let an embedded instance's dashboard agent take any free HTTP port.

    ``ray.init`` always asks the agent for the fixed port 52365; when another Ray
    instance on the machine holds it (a second ``oiod prepare``, a test session,
    a dev cluster), the agent retries with back-off for ~3.5 s and the raylet
    waits for it, so start-up doubles. ``ray.init`` has no option for that port,
    so the default is swapped for 0 (any free port) during the call only. If
    Ray's internals ever move, this silently does nothing.
    """
    try:
        from ray._private.parameter import RayParams as params

        orig = params.__init__
    except (ImportError, AttributeError):  # pragma: no cover - Ray internals changed
        yield
        return

    @functools.wraps(orig)
    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("dashboard_agent_listen_port", 0)
        orig(self, *args, **kwargs)

    params.__init__ = init
    try:
        yield
    finally:
        params.__init__ = orig


def _connect(cfg: Config) -> bool:
    """Join or start Ray; True if this call started it (and so must shut it down)."""
    ray = _ray()
    if ray.is_initialized():
        return False
    rc = cfg.ray
    if rc.address == "local":
        with _dynamic_agent_port():
            ray.init(num_cpus=rc.local_num_cpus, object_store_memory=rc.object_store_memory_mb * 1024 * 1024,
                     include_dashboard=False, namespace=rc.namespace, log_to_driver=True, configure_logging=False,
                     _system_config={"worker_niceness": rc.local_worker_niceness})
    else:
        try:
            ray.init(address=rc.address, namespace=rc.namespace, log_to_driver=True, configure_logging=False)
        except ConnectionError as exc:
            raise OiodError(f"ray.address {rc.address!r}: cannot join the Ray cluster ({exc})") from None
    return True


class _Bar:
    """Live progress in the driver (rich), or nothing when disabled."""

    def __init__(self, enabled: bool, total_images: int, total_shards: int) -> None:
        self.enabled = enabled
        self.t0 = time.monotonic()
        self.total_shards = total_shards
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("prepare"), BarColumn(), MofNCompleteColumn(), TextColumn("images"),
            TextColumn("{task.fields[rate]:>7.1f} img/s"), TextColumn("shards {task.fields[shards]}"),
            TextColumn("failed {task.fields[failed]}"), TimeElapsedColumn(),
            console=Console(stderr=True), refresh_per_second=4,
        )
        self.task = self.progress.add_task("prepare", total=total_images, rate=0.0,
                                           shards=f"0/{total_shards}", failed=0)
        self.progress.start()

    def update(self, ok: int, failed: int, shards_done: int) -> None:
        if not self.enabled:
            return
        el = max(1e-6, time.monotonic() - self.t0)
        self.progress.update(self.task, completed=ok + failed, rate=(ok + failed) / el,
                             shards=f"{shards_done}/{self.total_shards}", failed=failed)

    def close(self) -> None:
        if self.enabled:
            self.progress.stop()


# Driver loop cadence: how long one ray.wait blocks, how often nodes are listed and actors pinged.
_TICK_S = 0.5
_NODE_POLL_S = 1.0
_PING_EVERY_S = 1.0
# Most actors' worth of CPUs asked from the autoscaler at once (it stops at maxReplicas anyway).
_MAX_REQUEST_BUNDLES = 1024


@dataclass
class _Actor:
    """The driver's view of one download actor."""

    handle: Any
    node_id: str
    node_ip: str
    created: float
    ready_ref: Any = None  # pending while the actor (re)starts
    state: str = "starting"  # starting -> ready -> dead; ready -> starting after a restart
    name: str = ""
    ping_ref: Any = None
    ping_sent: float = 0.0
    last_seen: float = 0.0
    progress: tuple[int, int, int] = (0, 0, 0)
    inflight: set = field(default_factory=set)
    slow_start: bool = False


class ShardScheduler:
    """Runs shards on download actors spread over the cluster's alive nodes, elastically.

    One call to :meth:`run` owns the whole loop: it lists the nodes every second,
    keeps each alive node stocked with actors pinned to it (so a node that joins
    mid-run gets actors and shards, and nothing of a lost node can restart
    elsewhere behind the driver's back), dispatches shards to the least-loaded
    ready actor, pings every actor, and reschedules the shards of any actor whose
    node is dead or that has been silent for ``ray.node_loss_timeout_s``.

    Args:
        ray: the ``ray`` module (connected).
        cfg: the resolved configuration.
        tasks: shards to run.
        bar: the live progress display.
        make_actor: ``(node_id) -> handle``: starts one download actor pinned to that node.
    """

    def __init__(self, ray: Any, cfg: Config, tasks: list[ShardTask], bar: "_Bar",
                 make_actor: Callable[[str], Any]) -> None:
        self.ray = ray
        self.rc = cfg.ray
        self.bar = bar
        self.make_actor = make_actor
        self.queue: deque[ShardTask] = deque(tasks)
        self.inflight: dict[Any, tuple[ShardTask, _Actor, float]] = {}
        self.actors: list[_Actor] = []
        self.nodes: dict[str, dict[str, Any]] = {}  # alive nodes that can host an actor
        self.suspect: set[str] = set()  # nodes whose actors went silent: no new actors there
        self.attempts: Counter[str] = Counter()
        self.results: list[dict] = []
        self.failed: dict[str, str] = {}
        self.retries = 0
        self.rescheduled = 0
        self.lost_nodes: list[str] = []
        self.shards_per_node: Counter[str] = Counter()
        self.workers: set[str] = set()
        self._requested = -1
        self._last_node_poll = 0.0
        self._idle_since: Optional[float] = None
        self._last_wait_msg = 0.0

    # ------------------------------------------------------------------ nodes and actors

    def _capacity(self, node: dict[str, Any]) -> int:
        cpus = float(node.get("Resources", {}).get("CPU", 0))
        fit = int(cpus / self.rc.num_cpus_per_actor + 1e-9)
        return min(fit, self.rc.actors_per_node) if self.rc.actors_per_node else fit

    def _poll_nodes(self, now: float) -> None:
        if now - self._last_node_poll < _NODE_POLL_S:
            return
        self._last_node_poll = now
        self.nodes = {n["NodeID"]: n for n in self.ray.nodes() if n.get("Alive") and self._capacity(n) > 0}
        for a in self.actors:
            if a.state != "dead" and a.node_id not in self.nodes:
                self._lose(a, f"node {a.node_ip} is no longer alive", node_lost=True)
        self._stock(now)

    def _stock(self, now: float) -> None:
        """Start actors on alive nodes up to their capacity (and the override or the work left)."""
        remaining = len(self.queue) + len(self.inflight)
        live = [a for a in self.actors if a.state != "dead"]
        # No more actors than shards left (nor than the override); existing ones are kept.
        cap = min(self.rc.num_actors or remaining, remaining)
        per_node = Counter(a.node_id for a in live)
        total = len(live)
        while total < cap:
            # The node with the lowest share of its capacity in use, among those with room.
            room = [(per_node[nid] / self._capacity(n), nid) for nid, n in self.nodes.items()
                    if nid not in self.suspect and per_node[nid] < self._capacity(n)]
            if not room:
                break
            nid = min(room)[1]
            node = self.nodes[nid]
            ip = node.get("NodeManagerAddress", "?")
            log.info("starting a download actor on node %s (%d of %d there)", ip, per_node[nid] + 1,
                     self._capacity(node))
            self.actors.append(self._new_actor(nid, ip, now))
            per_node[nid] += 1
            total += 1
        self._request_capacity(cap)

    def _new_actor(self, node_id: str, node_ip: str, now: float) -> _Actor:
        handle = self.make_actor(node_id)
        return _Actor(handle=handle, node_id=node_id, node_ip=node_ip, created=now, ready_ref=handle.ready.remote(),
                      last_seen=now)

    def _request_capacity(self, wanted: int) -> None:
        """Tell the autoscaler (if one runs) how many actors' worth of CPUs the pending work could use."""
        if not self.rc.request_resources or self.rc.address == "local":
            return
        n = min(wanted, _MAX_REQUEST_BUNDLES)
        if n == self._requested:
            return
        self._requested = n
        try:
            from ray.autoscaler.sdk import request_resources

            request_resources(bundles=[{"CPU": self.rc.num_cpus_per_actor}] * n)
        except Exception as exc:  # noqa: BLE001 - only a hint to an autoscaler that may not exist
            log.debug("request_resources(%d) failed: %s", n, exc)

    def _lose(self, a: _Actor, why: str, node_lost: bool = False) -> None:
        """Give up on an actor: its shards go back to the front of the queue at once.

        With ``node_lost`` (dead in the GCS, or silent), no new actor goes to that node.
        """
        if a.state == "dead":
            return
        a.state = "dead"
        if node_lost:
            self.suspect.add(a.node_id)
        if node_lost and a.node_ip not in self.lost_nodes:
            self.lost_nodes.append(a.node_ip)
        if a.inflight:
            log.warning("download actor %s on %s lost (%s): rescheduling %d shard(s) on the other nodes",
                        a.name or "?", a.node_ip, why, len(a.inflight))
        for ref in list(a.inflight):
            t, _, _ = self.inflight.pop(ref)
            self.queue.appendleft(t)
            self.rescheduled += 1
        a.inflight.clear()
        with contextlib.suppress(Exception):
            self.ray.kill(a.handle, no_restart=True)

    # ------------------------------------------------------------------ events

    def _on_ready(self, a: _Actor, ref: Any, now: float) -> None:
        from ray.exceptions import RayError

        a.ready_ref = None
        try:
            a.name = self.ray.get(ref)
        except RayError as exc:
            log.warning("download actor on %s could not start: %s", a.node_ip, _short(exc))
            self._lose(a, "did not start")
            return
        a.state, a.last_seen, a.ping_sent = "ready", now, now
        self.workers.add(a.name)
        log.info("download actor %s on node %s ready after %.1fs", a.name, a.node_ip, now - a.created)

    def _on_ping(self, a: _Actor, ref: Any, now: float) -> None:
        from ray.exceptions import RayError

        a.ping_ref = None
        try:
            a.progress = tuple(self.ray.get(ref))
            a.last_seen = now
        except RayError:
            pass  # the shard refs carry the actor's failure; its restart is handled there

    def _on_shard(self, ref: Any, now: float) -> None:
        from ray.exceptions import RayActorError, RayError

        t, a, _ = self.inflight.pop(ref)
        a.inflight.discard(ref)
        try:
            stats = self.ray.get(ref)
        except RayError as exc:
            err = _short(exc)
            self.attempts[t.name] += 1
            self.retries += 1
            log.warning("shard %s failed on attempt %d (%s)", t.name, self.attempts[t.name], err[:300])
            if self.attempts[t.name] > self.rc.max_shard_retries:
                self.failed[t.name] = err[:500]
            else:
                self.queue.appendleft(t)
            if isinstance(exc, RayActorError) and a.state == "ready":
                # A restartable actor comes back by itself (ready resolves then); one out of
                # restarts fails its ready call and is replaced on an alive node.
                a.state, a.ready_ref, a.created, a.ping_ref = "starting", a.handle.ready.remote(), now, None
                a.slow_start = False
            return
        self.results.append(stats)
        self.shards_per_node[a.node_ip] += 1

    def _check_timeouts(self, now: float) -> None:
        rc = self.rc
        for a in self.actors:
            if a.state == "starting" and not a.slow_start and now - a.created > rc.actor_start_timeout_s:
                # Only said, not acted on: replacing a slow starter on a busy node only starts over;
                # an actor whose node dies fails its ready call, and the idle check bounds the wait.
                a.slow_start = True
                log.warning("download actor on %s has not started within %gs (ray.actor_start_timeout_s): "
                            "is the node short of %g CPU or slow to start workers?", a.node_ip,
                            rc.actor_start_timeout_s, rc.num_cpus_per_actor)
            elif a.state == "ready":
                if a.ping_ref is not None and now - a.ping_sent > rc.node_loss_timeout_s:
                    self._lose(a, f"no heartbeat for {rc.node_loss_timeout_s:g}s", node_lost=True)
                elif a.ping_ref is None and now - a.ping_sent >= _PING_EVERY_S:
                    a.ping_ref, a.ping_sent = a.handle.heartbeat.remote(), now
        if rc.shard_timeout_s:
            for ref, (_, _, t0) in list(self.inflight.items()):
                if now - t0 > rc.shard_timeout_s:
                    self.ray.cancel(ref)

    def _check_idle(self, now: float) -> None:
        """Wait (with a message) while no actor can run; fail after ``ray.join_timeout_s``."""
        if any(a.state == "ready" for a in self.actors):
            self._idle_since = None
            return
        if self._idle_since is None:
            self._idle_since = now
        waited = now - self._idle_since
        need = f"{self.rc.num_cpus_per_actor:g} CPU"
        if waited > self.rc.join_timeout_s:
            nodes = self.ray.nodes()
            alive = [n for n in nodes if n.get("Alive")]
            desc = ", ".join(f"{n.get('NodeManagerAddress')} ({float(n.get('Resources', {}).get('CPU', 0)):g} CPU)"
                             for n in alive) or "none"
            raise OiodError(
                f"ray: no download actor could run for {self.rc.join_timeout_s:g}s (ray.join_timeout_s): "
                f"no alive worker node offers {need} per actor (alive nodes: {desc}; lost: "
                f"{', '.join(self.lost_nodes) or 'none'}); start worker nodes (chart: ray.download.replicas) "
                f"or lower ray.num_cpus_per_actor"
            )
        if waited >= 5 and now - self._last_wait_msg >= 10:
            self._last_wait_msg = now
            starting = sum(1 for a in self.actors if a.state == "starting")
            what = (f"{starting} download actor(s) to start" if starting
                    else f"a Ray worker node with {need} for a download actor")
            log.warning("prepare: waiting for %s (%.0fs of ray.join_timeout_s=%gs); %d shard(s) pending", what,
                        waited, self.rc.join_timeout_s, len(self.queue) + len(self.inflight))

    def _dispatch(self) -> None:
        ready = [a for a in self.actors if a.state == "ready"]
        while self.queue and ready:
            a = min(ready, key=lambda x: len(x.inflight))
            if len(a.inflight) >= self.rc.max_shards_in_flight_per_actor:
                return
            t = self.queue.popleft()
            ref = a.handle.run.remote(t)
            self.inflight[ref] = (t, a, time.monotonic())
            a.inflight.add(ref)

    # ------------------------------------------------------------------ loop

    def run(self) -> None:
        """Run every shard (or record it as failed); returns when none is queued or in flight."""
        while self.queue or self.inflight:
            now = time.monotonic()
            self._poll_nodes(now)
            self._check_idle(now)
            self._dispatch()
            waiting: dict[Any, tuple[str, Any]] = {ref: ("shard", None) for ref in self.inflight}
            for a in self.actors:
                if a.state == "starting" and a.ready_ref is not None:
                    waiting[a.ready_ref] = ("ready", a)
                elif a.ping_ref is not None and a.state != "dead":
                    waiting[a.ping_ref] = ("ping", a)
            refs = list(waiting)
            if refs:
                done, _ = self.ray.wait(refs, num_returns=1, timeout=_TICK_S)
                if done:
                    done, _ = self.ray.wait(refs, num_returns=len(refs), timeout=0)
            else:
                time.sleep(_TICK_S)
                done = []
            now = time.monotonic()
            for ref in done:
                kind, a = waiting[ref]
                if kind == "shard":
                    if ref in self.inflight:
                        self._on_shard(ref, now)
                elif kind == "ready":
                    self._on_ready(a, ref, now)
                else:
                    self._on_ping(a, ref, now)
            self._check_timeouts(now)
            self._update_bar()
        self._request_capacity(0)

    def _update_bar(self) -> None:
        ok = sum(s.get("ok", 0) for s in self.results)
        bad = sum(s.get("failed", 0) for s in self.results)
        for a in self.actors:
            if a.state == "ready":
                ok, bad = ok + a.progress[0], bad + a.progress[1]
        self.bar.update(ok, bad, len(self.results))

    def shutdown(self) -> None:
        for a in self.actors:
            if a.state != "dead":
                with contextlib.suppress(Exception):
                    self.ray.kill(a.handle, no_restart=True)


def _short(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[-1] if text else ''}"


def _secrets_in_config(cfg_data: dict[str, Any]) -> list[str]:
    """``key (from $NAME)`` for every config string holding the value of a credential variable.

    The config is the download actors' constructor argument (and ``config.resolved.yaml``):
    a credential expanded into it from ``${NAME}`` would be stored and could be shown.
    """
    from openimages_od.config import _SECRET_NAME

    # Short values (test keys, placeholders) would match ordinary words; real keys are 20+ characters.
    secrets = {v: k for k, v in os.environ.items() if _SECRET_NAME.search(k) and len(v) >= 16}
    found: list[str] = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{where}.{k}" if where else str(k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{where}[{i}]")
        elif isinstance(node, str):
            found.extend(f"{where} (from ${name})" for value, name in secrets.items() if value in node)

    walk(cfg_data, "")
    return found


def _run_on_ray(cfg: Config, tasks: list[ShardTask], total_images: int) -> tuple[list[dict], dict[str, str], int, dict]:
    ray = _ray()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    rc = cfg.ray
    started = _connect(cfg)
    try:
        cpus = ray.cluster_resources().get("CPU", 0)
        if rc.num_actors and rc.address == "local" and rc.num_actors * rc.num_cpus_per_actor > cpus:
            need = rc.num_actors * rc.num_cpus_per_actor
            raise ConfigError(
                f"ray: {rc.num_actors} actors x {rc.num_cpus_per_actor} CPUs = {need} CPUs, but the local Ray "
                f"instance has {cpus:g}; lower ray.num_actors or ray.num_cpus_per_actor (fractions are fine)"
            )
        # Only non-secret settings may ride in runtime_env (the dashboard shows it; config
        # validation refuses credential names); workers read credentials from their own env.
        env = {k: os.environ[k] for k in rc.forward_env if os.environ.get(k)}
        worker_cls = ray.remote(ShardWorker)
        options: dict[str, Any] = dict(
            num_cpus=rc.num_cpus_per_actor, max_restarts=max(1, rc.max_shard_retries), max_task_retries=0,
            max_concurrency=max(8, rc.max_shards_in_flight_per_actor * 4),
            **({"runtime_env": {"env_vars": env}} if env else {}),
        )
        cfg_data = cfg.model_dump(mode="json")
        crash_once = os.environ.get(CRASH_ENV) or None

        def make_actor(node_id: str) -> Any:
            # Pinned (not soft): an actor of a lost node must not restart elsewhere unseen;
            # the scheduler starts replacements where it sees room.
            return worker_cls.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False), **options,
            ).remote(cfg_data, crash_once)

        bar = _Bar(rc.progress, total_images, len(tasks))
        sched = ShardScheduler(ray, cfg, tasks, bar, make_actor)
        try:
            sched.run()
        finally:
            bar.close()
            sched.shutdown()
        info = {"address": rc.address, "num_actors": len(sched.actors), "num_actors_override": rc.num_actors,
                "num_cpus_per_actor": rc.num_cpus_per_actor, "concurrency_per_actor": rc.concurrency_per_actor,
                "cluster_cpus": cpus, "workers": sorted(sched.workers),
                "shards_per_node": dict(sorted(sched.shards_per_node.items())),
                "lost_nodes": sched.lost_nodes, "shards_rescheduled": sched.rescheduled}
        return sched.results, sched.failed, sched.retries, info
    finally:
        if started:
            ray.shutdown()


def run_prepare(cfg: Config, retry_failed: bool = False, skip_plan: bool = False) -> int:
    """``oiod prepare``: plan if needed, then fetch, verify, transform and write every uncommitted shard.

    Args:
        cfg: the resolved configuration.
        retry_failed: also redo committed shards with failed images, re-fetching only those images.
        skip_plan: fail instead of planning when no plan exists.

    Returns:
        0 when every shard is committed.

    Raises:
        OiodError: no plan, Ray unreachable, or shards that still failed after ``ray.max_shard_retries``.
    """
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    t0 = time.monotonic()
    storage = Storage.from_config(cfg)
    plan_url = cfg.output_path("plan")
    leaked = _secrets_in_config(cfg.model_dump(mode="json"))
    if leaked:
        raise ConfigError(
            f"the configuration holds credentials: {', '.join(leaked)}; they would be saved in "
            "config.resolved.yaml and passed to every download actor (the Ray dashboard can show it): leave "
            "credentials in the environment (the standard AWS variables, a profile, or the pod's Secret)")
    manifest = _ensure_plan(cfg, storage, plan_url, skip_plan)
    save_resolved(cfg, cfg.output_path("tfrecords"), storage)
    tasks, committed = pending_tasks(cfg, storage, manifest, plan_url, retry_failed)
    total_images = sum(_plan_rows(manifest, t) for t in tasks)
    log.info("prepare: %d shards to do, %d already committed", len(tasks), len(committed))

    results: list[dict] = []
    failed: dict[str, str] = {}
    retries = 0
    info: dict[str, Any] = {"address": cfg.ray.address}
    if tasks:
        results, failed, retries, info = _run_on_ray(cfg, tasks, total_images)
    wall = time.monotonic() - t0
    all_stats = {**committed, **{s["name"]: s for s in results}}
    report = build_report(all_stats.values(), wall_s=wall, skipped=committed.keys(), failed_shards=failed,
                          ray_info=info, retries=retries)
    storage.write_json(cfg.output_path("prepare_report.json"), report)
    tot, run = report["totals"], report["this_run"]
    print(f"oiod prepare: {tot['shards']} shards committed ({run['shards_processed']} now, "
          f"{run['shards_skipped']} skipped), {tot['ok']} images ok, {tot['failed']} failed, "
          f"{run['images_per_s'] or 0:.1f} images/s; report {cfg.output_path('prepare_report.json')}",
          file=sys.stderr)
    if failed:
        raise OiodError(f"{len(failed)} shard(s) failed after {cfg.ray.max_shard_retries} retries: "
                        + "; ".join(f"{k}: {v}" for k, v in sorted(failed.items())[:5]))
    return 0


def _plan_rows(manifest: PlanManifest, task: ShardTask) -> int:
    sm = manifest.splits[task.split]
    # The manifest only has per-split totals; spread them evenly for the bar's total.
    return max(1, round(sm.num_images / max(1, sm.num_shards)))
