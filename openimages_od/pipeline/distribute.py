"""``oiod prepare`` on Ray: the only module that imports Ray.

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

Fault tolerance: actors are created with ``max_restarts``; a shard whose actor
died (or that raised, or ran past ``ray.shard_timeout_s``) is resubmitted by
the driver, at most ``ray.max_shard_retries`` times. Because a shard is only
visible once its stats are written and its bytes depend only on the plan and
the source bytes, a retried shard replaces nothing and duplicates nothing.

Work in flight is bounded (``ray.wait``), actors report per-image progress to
a small progress actor (only when ``ray.progress`` is on), and the driver
shows a live bar.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import sys
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator, Optional

from openimages_od import dataset as ds
from openimages_od.config import Config, save_resolved
from openimages_od.errors import ConfigError, OiodError
from openimages_od.layout import Layout, image_digest
from openimages_od.openimages.planio import PlanManifest, read_manifest
from openimages_od.outputlock import output_lock
from openimages_od.pipeline.cache import ImageCache
from openimages_od.pipeline.fetch import Fetcher
from openimages_od.pipeline.report import build_report
from openimages_od.pipeline.shard import CRASH_ENV, ShardContext, ShardTask, run_shard
from openimages_od.storage import ObjectNotFound, Storage

log = logging.getLogger(__name__)

__all__ = ["run_prepare", "ShardWorker", "ProgressTracker", "pending_tasks"]


# --------------------------------------------------------------------------- actors


class ProgressTracker:
    """Per-image counters fed by the download actors (a Ray actor with no CPU)."""

    def __init__(self) -> None:
        self.ok = 0
        self.failed = 0
        self.bytes = 0

    def add(self, ok: int, failed: int, nbytes: int) -> None:
        self.ok += ok
        self.failed += failed
        self.bytes += nbytes

    def get(self) -> tuple[int, int, int]:
        return self.ok, self.failed, self.bytes


class ShardWorker:
    """A download actor: one event loop, one HTTP pool, one S3 thread pool, shared by its shards."""

    def __init__(self, cfg_data: dict[str, Any], progress_name: Optional[str] = None,
                 crash_once: Optional[str] = None) -> None:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        self.cfg = Config.model_validate(cfg_data)
        # The progress actor is found by name, not passed as a handle: a handle among the
        # constructor arguments of a restartable actor is kept in the object store, and a
        # restart can fail once it is gone (Ray warns about exactly that).
        self.progress_name = progress_name
        self.progress: Any = None
        self.crash_once = crash_once
        self._ctx: Optional[ShardContext] = None
        self._pending = [0, 0, 0]
        self._flusher: Optional[asyncio.Task] = None
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
                on_image=self._on_image,
                crash_once=self.crash_once,
                worker=self.name,
                cache=(ImageCache(Storage.from_config(self.cfg), Layout.from_config(self.cfg),
                                  image_digest(self.cfg.image)) if self.cfg.output.image_cache else None),
            )
            if self.progress_name:
                try:
                    self.progress = _ray().get_actor(self.progress_name, namespace=rc.namespace)
                except ValueError:  # the bar is a nicety: a missing tracker must not fail a shard
                    log.warning("progress actor %s not found: no live progress from %s", self.progress_name, self.name)
                else:
                    self._flusher = asyncio.get_running_loop().create_task(self._flush_loop())
        return self._ctx

    def _on_image(self, ok: bool, nbytes: int) -> None:
        self._pending[0 if ok else 1] += 1
        self._pending[2] += nbytes

    def _flush(self) -> None:
        if self.progress is not None and (self._pending[0] or self._pending[1]):
            ok, failed, nbytes = self._pending
            self._pending = [0, 0, 0]
            self.progress.add.remote(ok, failed, nbytes)  # fire and forget

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            self._flush()

    async def ready(self) -> str:
        return self.name

    async def run(self, task: ShardTask) -> dict[str, Any]:
        stats = await run_shard(task, self._context())
        self._flush()
        return stats


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
            tasks.append(ShardTask(sp.split, sp.index, sp.num_shards, sp.plan_url,
                                   retry_failed=retry_failed and s.state == "committed", plan_sha256=sp.plan_sha256,
                                   key=sp.key, plan_digest=manifest.digest))
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


def _run_on_ray(cfg: Config, tasks: list[ShardTask], total_images: int) -> tuple[list[dict], dict[str, str], int, dict]:
    ray = _ray()
    from ray.exceptions import GetTimeoutError, RayActorError, RayError

    rc = cfg.ray
    started = _connect(cfg)
    try:
        cpus = ray.cluster_resources().get("CPU", 0)
        need = rc.num_actors * rc.num_cpus_per_actor
        if need > cpus and rc.address == "local":
            raise ConfigError(
                f"ray: {rc.num_actors} actors x {rc.num_cpus_per_actor} CPUs = {need} CPUs, but the local Ray "
                f"instance has {cpus:g}; lower ray.num_actors or ray.num_cpus_per_actor (fractions are fine)"
            )
        # The tracker is a process of its own: only worth it when someone watches the bar.
        progress_name = f"oiod-progress-{os.getpid()}-{time.time_ns()}" if rc.progress else None
        progress = (ray.remote(num_cpus=0)(ProgressTracker).options(name=progress_name, namespace=rc.namespace).remote()
                    if progress_name else None)
        # Credentials in the driver's environment reach the actors even on a
        # cluster (or an embedded instance) started before they were set.
        env = {k: os.environ[k] for k in rc.forward_env if os.environ.get(k)}
        worker_cls = ray.remote(ShardWorker).options(
            num_cpus=rc.num_cpus_per_actor, max_restarts=max(1, rc.max_shard_retries), max_task_retries=0,
            max_concurrency=max(8, rc.max_shards_in_flight_per_actor * 4),
            **({"runtime_env": {"env_vars": env}} if env else {}),
        )
        cfg_data = cfg.model_dump(mode="json")
        crash_once = os.environ.get(CRASH_ENV) or None

        def new_actor() -> Any:
            return worker_cls.remote(cfg_data, progress_name, crash_once)

        actors = [new_actor() for _ in range(rc.num_actors)]
        ready, not_ready = ray.wait([a.ready.remote() for a in actors], num_returns=len(actors),
                                    timeout=rc.actor_start_timeout_s)
        if not_ready:
            raise OiodError(
                f"ray: only {len(ready)} of {rc.num_actors} download actors started within "
                f"{rc.actor_start_timeout_s:g}s (each needs {rc.num_cpus_per_actor} CPU; cluster has {cpus:g} CPUs)"
            )
        workers = ray.get(ready)

        queue: deque[ShardTask] = deque(tasks)
        inflight: dict[Any, tuple[ShardTask, int, float]] = {}
        load = [0] * len(actors)
        attempts: Counter[str] = Counter()
        results: list[dict] = []
        failed: dict[str, str] = {}
        retries = 0
        bar = _Bar(rc.progress, total_images, len(tasks))
        try:
            while queue or inflight:
                while queue and min(load) < rc.max_shards_in_flight_per_actor:
                    i = load.index(min(load))
                    t = queue.popleft()
                    inflight[actors[i].run.remote(t)] = (t, i, time.monotonic())
                    load[i] += 1
                done, _ = ray.wait(list(inflight), num_returns=1, timeout=0.5)
                if rc.shard_timeout_s:
                    now = time.monotonic()
                    for ref, (t, _, t0) in list(inflight.items()):
                        if ref not in done and now - t0 > rc.shard_timeout_s:
                            ray.cancel(ref)
                for ref in done:
                    t, i, _ = inflight.pop(ref)
                    load[i] -= 1
                    try:
                        results.append(ray.get(ref))
                        continue
                    except RayError as exc:
                        err = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
                        actor_died = isinstance(exc, RayActorError)
                    attempts[t.name] += 1
                    retries += 1
                    log.warning("shard %s failed on attempt %d (%s)", t.name, attempts[t.name], err[:300])
                    if attempts[t.name] > rc.max_shard_retries:
                        failed[t.name] = err[:500]
                    else:
                        queue.appendleft(t)
                    if actor_died:
                        # A restartable actor comes back by itself; one out of restarts is replaced.
                        try:
                            ray.get(actors[i].ready.remote(), timeout=rc.actor_start_timeout_s)
                        except (RayError, GetTimeoutError):
                            log.warning("download actor %d is gone: starting a new one", i)
                            actors[i] = new_actor()
                if progress is not None:
                    try:
                        ok, bad, _ = ray.get(progress.get.remote(), timeout=10)
                        bar.update(ok, bad, len(results))
                    except (RayError, GetTimeoutError):
                        pass
        finally:
            bar.close()
        for a in actors:
            ray.kill(a, no_restart=True)
        if progress is not None:
            ray.kill(progress, no_restart=True)
        info = {"address": rc.address, "num_actors": rc.num_actors, "num_cpus_per_actor": rc.num_cpus_per_actor,
                "concurrency_per_actor": rc.concurrency_per_actor, "cluster_cpus": cpus, "workers": workers}
        return results, failed, retries, info
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
    storage = Storage.from_config(cfg)
    layout = Layout.from_config(cfg)
    with output_lock(storage, layout.lock, cfg.output.lock_ttl_s, "prepare") as lock:
        return _prepare_locked(cfg, storage, layout, lock, retry_failed, skip_plan)


def _prepare_locked(cfg: Config, storage: Storage, layout: Layout, lock: Any, retry_failed: bool,
                    skip_plan: bool) -> int:
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
        results, failed, retries, info = _run_on_ray(cfg, tasks, total_images)
    wall = time.monotonic() - t0
    all_stats = {**committed, **{s["name"]: s for s in results}}
    report = build_report(all_stats.values(), wall_s=wall, skipped=committed.keys(), failed_shards=failed,
                          ray_info=info, retries=retries)
    lock.check()
    dataset_url = None
    if not failed:
        doc = ds.build_dataset(cfg, manifest, ds.scan(cfg, storage, manifest))
        report["dataset"] = {"digest": doc["digest"], "splits": sorted(doc["splits"])}
        dataset_url = ds.write_dataset(cfg, storage, doc)
    storage.write_json(layout.prepare_report, report)
    tot, run = report["totals"], report["this_run"]
    print(f"oiod prepare: {tot['shards']} shards committed ({run['shards_processed']} now, "
          f"{run['shards_skipped']} skipped), {tot['ok']} images ok, {tot['failed']} failed, "
          f"{run['source_fetches']} fetched from the source, {run['cache_hits']} from the cache, "
          f"{run['images_per_s'] or 0:.1f} images/s; report {layout.prepare_report}"
          + (f"; dataset {report['dataset']['digest'][:12]} in {dataset_url}" if dataset_url else ""),
          file=sys.stderr)
    if failed:
        raise OiodError(f"{len(failed)} shard(s) failed after {cfg.ray.max_shard_retries} retries: "
                        + "; ".join(f"{k}: {v}" for k, v in sorted(failed.items())[:5]))
    return 0


def _plan_rows(manifest: PlanManifest, task: ShardTask) -> int:
    sm = manifest.splits[task.split]
    # The manifest only has per-split totals; spread them evenly for the bar's total.
    return max(1, round(sm.num_images / max(1, sm.num_shards)))
