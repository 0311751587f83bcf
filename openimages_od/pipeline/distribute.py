# Over 400 lines: all of prepare's Ray glue but the scheduling loop, in one module by design.
"""``oiod prepare`` on Ray: connects to Ray and builds the actors; its scheduling
loop is :mod:`openimages_od.pipeline.scheduler` (the only other module that touches Ray).

The driver (:func:`run_prepare`) holds the output lock, makes sure a plan
exists, asks :mod:`openimages_od.dataset` which shards are not committed for
the current plan (committed ones are skipped without any request; stale ones,
of another plan, are rebuilt; files of shards the plan no longer has are
removed), and hands them to a
pool of async download actors (:class:`ShardWorker`). Each actor runs
:func:`openimages_od.pipeline.shard.run_shard` for up to
``ray.max_shards_in_flight_per_actor`` shards at once, with
``ray.concurrency_per_actor`` image fetches in flight and
``ray.decode_threads_per_actor`` threads for decode/resize/encode.

Scaling: unless ``ray.num_actors`` overrides it, the number of actors follows
the cluster (:class:`~openimages_od.pipeline.scheduler.ShardScheduler`): each alive node gets
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
show the others); workers read credentials from their own environment, and a
config holding a credential's value is refused before anything runs.
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
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from openimages_od import dataset as ds
from openimages_od.config import Config, RayConfig, save_resolved
from openimages_od.errors import ConfigError, OiodError
from openimages_od.layout import Layout, image_digest
from openimages_od.openimages.planio import PlanManifest, read_manifest
from openimages_od.outputlock import output_lock
from openimages_od.pipeline.cache import ImageCache
from openimages_od.pipeline.fetch import Fetcher
from openimages_od.pipeline.progress import ProgressBar
from openimages_od.pipeline.report import build_report
from openimages_od.pipeline.scheduler import ShardScheduler
from openimages_od.pipeline.shard import ShardContext, ShardTask, run_shard
from openimages_od.storage import ObjectNotFound, Storage
from openimages_od.storage_setup import storage_from_config

log = logging.getLogger(__name__)

__all__ = ["RayRun", "ShardScheduler", "ShardWorker", "connect", "pending_tasks", "run_prepare"]


# --------------------------------------------------------------------------- actors


class ShardWorker:
    """A download actor: one event loop, one HTTP pool, one S3 thread pool, shared by its shards."""

    def __init__(self, cfg_data: dict[str, Any]) -> None:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        self.cfg = Config.model_validate(cfg_data)
        self._ctx: ShardContext | None = None
        # Images finished in the shards still running, per shard: (ok, failed, bytes).
        self._live: dict[str, list[int]] = {}
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    def _context(self) -> ShardContext:
        if self._ctx is None:
            rc = self.cfg.ray
            self._ctx = ShardContext(
                cfg=self.cfg,
                storage=storage_from_config(self.cfg),
                fetcher=Fetcher(
                    self.cfg.source.images,
                    concurrency=rc.concurrency_per_actor,
                    storage=storage_from_config(self.cfg),
                ),
                cpu_pool=ThreadPoolExecutor(rc.decode_threads_per_actor, thread_name_prefix="oiod-cpu"),
                semaphore=asyncio.Semaphore(rc.concurrency_per_actor),
                worker=self.name,
                cache=(
                    ImageCache(
                        storage_from_config(self.cfg),
                        Layout.from_config(self.cfg),
                        image_digest(self.cfg.image),
                    )
                    if self.cfg.output.image_cache
                    else None
                ),
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
    manifest_url = Layout.from_config(cfg).plan_manifest
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

    The commit rule is :mod:`openimages_od.layout`'s (stats naming the current
    shard key); :func:`openimages_od.dataset.scan` applies it with one listing
    per split. With ``retry_failed``, committed shards whose stats record failed
    images are redone (only their failed images are re-fetched).
    """
    wanted = set(cfg.selection.splits) or set(manifest.splits)
    tasks: list[ShardTask] = []
    committed: dict[str, dict[str, Any]] = {}
    for s in ds.scan(cfg, storage, manifest, wanted):
        sp = s.spec
        redo = s.state != "committed" or (retry_failed and (s.stats or {}).get("failed", 0) > 0)
        if redo:
            tasks.append(
                ShardTask(
                    sp.split,
                    sp.index,
                    sp.num_shards,
                    sp.plan_url,
                    retry_failed=retry_failed and s.state == "committed",
                    plan_sha256=sp.plan_sha256,
                    key=sp.key,
                    plan_digest=manifest.digest,
                )
            )
        else:
            committed[sp.name] = s.stats or {}
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
    waits for it, so start-up doubles. The default is swapped for 0 (any free
    port) during the call only; ``tests/test_pipeline_units.py`` fails if Ray's
    internals move and this stops doing it.
    """
    # No supported option exists (checked on Ray 2.60): ray.init has no agent-port
    # argument, no RAY_* variable or _system_config key sets it (the default is a
    # plain constant bound into RayParams' signature), include_dashboard=False still
    # starts the agent's HTTP server, and the one public knob, `ray start --head
    # --dashboard-agent-listen-port=0`, makes a detached instance that only `ray stop`
    # (every Ray instance of the user on the machine) takes down.
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

    setattr(params, "__init__", init)  # noqa: B010 - setattr: a method assignment mypy would refuse
    try:
        yield
    finally:
        setattr(params, "__init__", orig)  # noqa: B010


def _connect(cfg: Config) -> bool:
    """:func:`connect` with the ``ray`` section of ``cfg`` (for callers holding the whole config)."""
    return connect(cfg.ray)


def connect(rc: RayConfig) -> bool:
    """Join or start Ray; True if this call started it (and so must shut it down).

    The embedded instance (``ray.address: local``) starts with no dashboard (Ray
    still runs its minimal API server, which has no off switch), a bounded object
    store (shards travel as stats dicts, never as objects), and workers at
    ``ray.local_worker_niceness``.
    """
    # Ray's worker prestart is kept: measured on 2 cores (3 interleaved rounds of ray.init
    # + 2 actors ready), turning off prestart_worker_first_driver or enable_worker_prestart
    # moved the wait from ray.init to the first actors (the actors reuse the prestarted
    # workers) with the same CPU (4.0-4.5 s per start-up) and no change beyond the noise,
    # and a 100 MB object store started no faster than 512 MB.
    ray = _ray()
    if ray.is_initialized():
        return False
    if rc.address == "local":
        with _dynamic_agent_port():
            ray.init(
                num_cpus=rc.local_num_cpus,
                object_store_memory=rc.object_store_memory_mb * 1024 * 1024,
                include_dashboard=False,
                namespace=rc.namespace,
                log_to_driver=True,
                configure_logging=False,
                _system_config={"worker_niceness": rc.local_worker_niceness},
            )
    else:
        try:
            ray.init(address=rc.address, namespace=rc.namespace, log_to_driver=True, configure_logging=False)
        except ConnectionError as exc:
            raise OiodError(f"ray.address {rc.address!r}: cannot join the Ray cluster ({exc})") from None
    return True


def _secrets_in_config(cfg_data: dict[str, Any]) -> list[str]:
    """``key (from $NAME)`` for every config string holding the value of a credential variable.

    The config is the download actors' constructor argument (and ``config.resolved.yaml``):
    a credential expanded into it from ``${NAME}`` would be stored and could be shown.
    """
    from openimages_od.config import SECRET_ENV_NAME

    # Short values (test keys, placeholders) would match ordinary words; real keys are 20+ characters.
    secrets = {v: k for k, v in os.environ.items() if SECRET_ENV_NAME.search(k) and len(v) >= 16}
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


class RayRun:
    """One prepare's shards on Ray, in named steps: connect, check capacity, build actors, schedule, report.

    The scheduling loop itself is :class:`~openimages_od.pipeline.scheduler.ShardScheduler`;
    this class only prepares what it needs (the actor factory, the live bar) and
    turns its outcome into the report's ``ray`` section.

    Args:
        cfg: the resolved configuration (the actors receive it whole: it is their input).
    """

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.rc = cfg.ray

    def check_capacity(self, cluster_cpus: float) -> None:
        """Refuse an explicit actor count the embedded instance cannot hold (it would wait forever).

        Raises:
            ConfigError: ``ray.num_actors`` x ``ray.num_cpus_per_actor`` > the local instance's CPUs.
        """
        rc = self.rc
        if rc.num_actors and rc.address == "local" and rc.num_actors * rc.num_cpus_per_actor > cluster_cpus:
            need = rc.num_actors * rc.num_cpus_per_actor
            raise ConfigError(
                f"ray: {rc.num_actors} actors x {rc.num_cpus_per_actor} CPUs = {need} CPUs, but the local Ray "
                f"instance has {cluster_cpus:g}; lower ray.num_actors or ray.num_cpus_per_actor (fractions are fine)"
            )

    def actor_options(self) -> dict[str, Any]:
        """``.options()`` of every download actor (without its node pinning)."""
        rc = self.rc
        # Only non-secret settings may ride in runtime_env (the dashboard shows it; config
        # validation refuses credential names); workers read credentials from their own env.
        env = {k: os.environ[k] for k in rc.forward_env if os.environ.get(k)}
        return dict(
            num_cpus=rc.num_cpus_per_actor,
            max_restarts=max(1, rc.max_shard_retries),
            max_task_retries=0,
            max_concurrency=max(8, rc.max_shards_in_flight_per_actor * 4),
            **({"runtime_env": {"env_vars": env}} if env else {}),
        )

    def actor_factory(self, ray: Any) -> Callable[[str], Any]:
        """``(node_id) -> actor handle``: one download actor pinned to that node."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        worker_cls = ray.remote(ShardWorker)
        options = self.actor_options()
        cfg_data = self.cfg.model_dump(mode="json")

        def make_actor(node_id: str) -> Any:
            # Pinned (not soft): an actor of a lost node must not restart elsewhere unseen;
            # the scheduler starts replacements where it sees room.
            return worker_cls.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
                **options,
            ).remote(cfg_data)

        return make_actor

    def info(self, sched: ShardScheduler, cluster_cpus: float) -> dict[str, Any]:
        """The report's ``ray`` section: how the run was spread and what it survived."""
        rc = self.rc
        return {
            "address": rc.address,
            "num_actors": len(sched.actors),
            "num_actors_override": rc.num_actors,
            "num_cpus_per_actor": rc.num_cpus_per_actor,
            "concurrency_per_actor": rc.concurrency_per_actor,
            "cluster_cpus": cluster_cpus,
            "workers": sorted(sched.workers),
            "shards_per_node": dict(sorted(sched.shards_per_node.items())),
            "lost_nodes": sched.lost_nodes,
            "shards_rescheduled": sched.rescheduled,
        }

    def run(
        self, tasks: list[ShardTask], total_images: int
    ) -> tuple[list[dict[str, Any]], dict[str, str], int, dict[str, Any]]:
        """Run ``tasks`` to completion (or to their retry limit).

        Returns:
            (stats of the committed shards, failed shard -> last error, retries, the ``ray`` report section).

        Raises:
            ConfigError: see :meth:`check_capacity`.
            OiodError: Ray unreachable, or no usable node within ``ray.join_timeout_s``.
        """
        ray = _ray()
        started = connect(self.rc)
        try:
            cpus = ray.cluster_resources().get("CPU", 0)
            self.check_capacity(cpus)
            bar = ProgressBar(self.rc.progress, total_images, len(tasks))
            sched = ShardScheduler(ray, self.rc, tasks, bar, self.actor_factory(ray))
            try:
                sched.run()
            finally:
                bar.close()
                sched.shutdown()
            return sched.results, sched.failed, sched.retries, self.info(sched, cpus)
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
    storage = storage_from_config(cfg)
    leaked = _secrets_in_config(cfg.model_dump(mode="json"))
    if leaked:
        raise ConfigError(
            f"the configuration holds credentials: {', '.join(leaked)}; they would be saved in "
            "config.resolved.yaml and passed to every download actor (the Ray dashboard can show it): leave "
            "credentials in the environment (the standard AWS variables, a profile, or the pod's Secret)"
        )
    layout = Layout.from_config(cfg)
    with output_lock(storage, layout.lock, cfg.output.lock_ttl_s, "prepare") as lock:
        return _prepare_locked(cfg, storage, layout, lock, retry_failed, skip_plan)


def _prepare_locked(
    cfg: Config, storage: Storage, layout: Layout, lock: Any, retry_failed: bool, skip_plan: bool
) -> int:
    t0 = time.monotonic()
    plan_url = layout.plan_dir
    manifest = _ensure_plan(cfg, storage, plan_url, skip_plan)
    ds.check_image_settings(cfg, manifest)
    save_resolved(cfg, layout.tfrecords_dir(), storage)
    ds.remove_orphans(cfg, storage, manifest)
    tasks, committed = pending_tasks(cfg, storage, manifest, plan_url, retry_failed)
    total_images = sum(_plan_rows(manifest, t) for t in tasks)
    log.info("prepare: %d shards to do, %d already committed", len(tasks), len(committed))
    if tasks:
        # dataset.json names complete, consistent datasets only: gone before any shard it lists changes.
        storage.delete(layout.dataset)

    results: list[dict] = []
    failed: dict[str, str] = {}
    retries = 0
    info: dict[str, Any] = {"address": cfg.ray.address}
    if tasks:
        results, failed, retries, info = RayRun(cfg).run(tasks, total_images)
    wall = time.monotonic() - t0
    all_stats = {**committed, **{s["name"]: s for s in results}}
    report = build_report(
        all_stats.values(),
        wall_s=wall,
        skipped=committed.keys(),
        failed_shards=failed,
        ray_info=info,
        retries=retries,
    )
    lock.check()
    dataset_url = None
    if not failed:
        doc = ds.build_dataset(cfg, manifest, ds.scan(cfg, storage, manifest))
        report["dataset"] = {"digest": doc["digest"], "splits": sorted(doc["splits"])}
        dataset_url = ds.write_dataset(cfg, storage, doc)
    storage.write_json(layout.prepare_report, report)
    tot, run = report["totals"], report["this_run"]
    print(
        f"oiod prepare: {tot['shards']} shards committed ({run['shards_processed']} now, "
        f"{run['shards_skipped']} skipped), {tot['ok']} images ok, {tot['failed']} failed, "
        f"{run['source_fetches']} fetched from the source, {run['cache_hits']} from the cache, "
        f"{run['images_per_s'] or 0:.1f} images/s; report {layout.prepare_report}"
        + (f"; dataset {report['dataset']['digest'][:12]} in {dataset_url}" if dataset_url else ""),
        file=sys.stderr,
    )
    if failed:
        raise OiodError(
            f"{len(failed)} shard(s) failed after {cfg.ray.max_shard_retries} retries: "
            + "; ".join(f"{k}: {v}" for k, v in sorted(failed.items())[:5])
        )
    return 0


def _plan_rows(manifest: PlanManifest, task: ShardTask) -> int:
    sm = manifest.splits[task.split]
    # The manifest only has per-split totals; spread them evenly for the bar's total.
    return max(1, round(sm.num_images / max(1, sm.num_shards)))
