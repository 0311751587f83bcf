# Over 400 lines: one state machine (actors per node, heartbeats, lost and joining nodes, retries) whose steps share its state.
"""The driver's scheduling loop for ``oiod prepare`` (Ray glue beside :mod:`.distribute`).

:class:`ShardScheduler` keeps every alive node stocked with download actors
pinned to it, dispatches shards to the least-loaded ready actor, pings every
actor (the heartbeat also carries live progress), and reschedules the shards of
an actor whose node is dead or silent. It receives the ``ray`` module and an
actor factory from :class:`openimages_od.pipeline.distribute.RayRun`, and
imports only Ray's exception types and autoscaler SDK itself (lazily).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from openimages_od.config import RayConfig
from openimages_od.errors import OiodError
from openimages_od.pipeline.shard import ShardTask

log = logging.getLogger(__name__)

__all__ = ["ShardScheduler"]


class ProgressView(Protocol):
    """What the scheduler reports progress to (the driver's live bar)."""

    def update(self, ok: int, failed: int, shards_done: int) -> None: ...


# Driver loop cadence: how long one ray.wait blocks, how often nodes are listed and actors pinged.
_TICK_S = 0.5
_NODE_POLL_S = 1.0
_PING_EVERY_S = 1.0
# Failed actor starts on one node before it gets no more actors in this run.
_MAX_START_FAILURES = 3
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
        rc: the ``ray`` section of the configuration.
        tasks: shards to run.
        bar: the live progress display.
        make_actor: ``(node_id) -> handle``: starts one download actor pinned to that node.
    """

    def __init__(
        self,
        ray: Any,
        rc: RayConfig,
        tasks: list[ShardTask],
        bar: ProgressView,
        make_actor: Callable[[str], Any],
    ) -> None:
        self.ray = ray
        self.rc = rc
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
        self._idle_since: float | None = None
        self._last_wait_msg = 0.0
        self.start_failures: Counter[str] = Counter()  # per node
        self.last_start_error = ""

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
            room = [
                (per_node[nid] / self._capacity(n), nid)
                for nid, n in self.nodes.items()
                if nid not in self.suspect and per_node[nid] < self._capacity(n)
            ]
            if not room:
                break
            nid = min(room)[1]
            node = self.nodes[nid]
            ip = node.get("NodeManagerAddress", "?")
            log.info(
                "starting a download actor on node %s (%d of %d there)",
                ip,
                per_node[nid] + 1,
                self._capacity(node),
            )
            self.actors.append(self._new_actor(nid, ip, now))
            per_node[nid] += 1
            total += 1
        self._request_capacity(cap)

    def _new_actor(self, node_id: str, node_ip: str, now: float) -> _Actor:
        handle = self.make_actor(node_id)
        return _Actor(
            handle=handle,
            node_id=node_id,
            node_ip=node_ip,
            created=now,
            ready_ref=handle.ready.remote(),
            last_seen=now,
        )

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
        except Exception as exc:
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
            log.warning(
                "download actor %s on %s lost (%s): rescheduling %d shard(s) on the other nodes",
                a.name or "?",
                a.node_ip,
                why,
                len(a.inflight),
            )
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
            self.last_start_error = _short(exc)[:300]
            self.start_failures[a.node_id] += 1
            log.warning("download actor on %s could not start: %s", a.node_ip, self.last_start_error)
            self._lose(a, "did not start")
            if self.start_failures[a.node_id] >= _MAX_START_FAILURES:
                # Retrying a node where actors keep failing to start (broken image, env) only spins.
                log.warning(
                    "no more download actors on %s after %d failed starts",
                    a.node_ip,
                    self.start_failures[a.node_id],
                )
                self.suspect.add(a.node_id)
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
                log.warning(
                    "download actor on %s has not started within %gs (ray.actor_start_timeout_s): "
                    "is the node short of %g CPU or slow to start workers?",
                    a.node_ip,
                    rc.actor_start_timeout_s,
                    rc.num_cpus_per_actor,
                )
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
            desc = (
                ", ".join(
                    f"{n.get('NodeManagerAddress')} ({float(n.get('Resources', {}).get('CPU', 0)):g} CPU)"
                    for n in alive
                )
                or "none"
            )
            raise OiodError(
                f"ray: no download actor could run for {self.rc.join_timeout_s:g}s (ray.join_timeout_s): "
                f"no alive worker node offers {need} per actor (alive nodes: {desc}; lost: "
                f"{', '.join(self.lost_nodes) or 'none'}"
                + (f"; last actor start error: {self.last_start_error}" if self.last_start_error else "")
                + "); start worker nodes (chart: ray.download.replicas) or lower ray.num_cpus_per_actor"
            )
        if waited >= 5 and now - self._last_wait_msg >= 10:
            self._last_wait_msg = now
            starting = sum(1 for a in self.actors if a.state == "starting")
            what = (
                f"{starting} download actor(s) to start"
                if starting
                else f"a Ray worker node with {need} for a download actor"
            )
            log.warning(
                "prepare: waiting for %s (%.0fs of ray.join_timeout_s=%gs); %d shard(s) pending",
                what,
                waited,
                self.rc.join_timeout_s,
                len(self.queue) + len(self.inflight),
            )

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
