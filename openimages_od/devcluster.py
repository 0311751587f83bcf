"""A multi-node Ray cluster on one machine, for tests and the scaling benchmark.

Each node is its own ``ray start --block`` process group on a distinct loopback
address (head 127.0.0.2, workers 127.0.0.3 and up: with 127.0.0.1 Ray rewrites
the address to the host's), with explicit free ports, so several clusters (and
other Ray instances) can share the machine. Joining a cluster needs
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1`` in the ``ray start`` processes.

Nothing is stopped by name: every node is stopped through the process group of
the ``ray start`` it started (``ray stop`` would stop every Ray on the host).
Like :mod:`openimages_od.devservices`, nothing here is used by the pipeline.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from openimages_od.devservices import free_port

__all__ = ["LoopbackRayCluster", "RayNode"]

_BIN = Path(sys.executable).parent


@dataclass
class RayNode:
    """One ``ray start --block`` process group."""

    ip: str
    proc: subprocess.Popen
    log: Path
    temp_dir: str
    ports: dict[str, int] = field(default_factory=dict)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def raylet_pid(self) -> int | None:
        """PID of this node's raylet (a child of ``ray start``), if it runs."""
        import psutil

        try:
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                if child.name() == "raylet":
                    return child.pid
        except psutil.NoSuchProcess:
            return None
        return None

    def _tree(self) -> list[Any]:
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def signal_all(self, sig: int) -> None:
        """Send ``sig`` to every process of the node (workers may sit in process groups of their own)."""
        for p in self._tree():
            with contextlib.suppress(Exception):
                p.send_signal(sig)

    def freeze(self) -> None:
        """Stop every process of the node without killing it: a hung or partitioned node."""
        self.signal_all(signal.SIGSTOP)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the node's whole process tree (raylet, workers, agents)."""
        tree = self._tree()
        if self.proc.poll() is not None and not _group_alive(self.proc.pid) and len(tree) <= 1:
            return
        for p in tree[1:]:
            with contextlib.suppress(Exception):
                p.send_signal(signal.SIGCONT)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        for p in tree[1:]:  # workers outside the group
            with contextlib.suppress(Exception):
                p.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


class LoopbackRayCluster:
    """A Ray head and worker raylets, each on its own loopback address.

    Args:
        head_ip: the head's address (127.0.0.2 by default).
        head_cpus: CPUs the head offers (0: only the driver and the dashboard run there, as
            on a KubeRay head with ``num-cpus: 0``).
        dashboard: start the dashboard (needed for its HTTP API; ~1 s more start-up).
        env: extra environment for every node (e.g. credentials the workers must have).
        object_store_mb: object store per node.
        system_config: ``_system_config`` for the head (e.g. faster node-death detection).
    """

    def __init__(
        self,
        head_ip: str = "127.0.0.2",
        head_cpus: int = 0,
        dashboard: bool = True,
        env: dict[str, str] | None = None,
        object_store_mb: int = 80,
        system_config: dict[str, Any] | None = None,
    ) -> None:
        self.head_ip = head_ip
        self.head_cpus = head_cpus
        self.dashboard = dashboard
        self.env_extra = dict(env or {})
        self.object_store_mb = object_store_mb
        self.system_config = dict(system_config or {})
        self.root = Path(tempfile.mkdtemp(prefix="oiodcl", dir="/tmp"))
        # Token auth as the chart sets it (authOptions): deterministic whatever ~/.ray holds.
        self.token = secrets.token_hex(32)
        self.head: RayNode | None = None
        self.workers: list[RayNode] = []

    # ------------------------------------------------------------------ addresses

    @property
    def address(self) -> str:
        """GCS address (``ray.init(address=...)``)."""
        assert self.head is not None
        return f"{self.head_ip}:{self.head.ports['gcs']}"

    @property
    def dashboard_url(self) -> str:
        assert self.head is not None
        return f"http://{self.head_ip}:{self.head.ports['dash']}"

    def env(self) -> dict[str, str]:
        """Environment for a driver that joins this cluster."""
        e = {
            **os.environ,
            **self.env_extra,
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",
            "PATH": f"{_BIN}:{os.environ.get('PATH', '')}",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
        }
        e.pop("RAY_ADDRESS", None)
        return e

    # ------------------------------------------------------------------ nodes

    def _start(self, ip: str, args: list[str], name: str, ports: dict[str, int]) -> RayNode:
        temp_dir = str(self.root / name)
        os.makedirs(temp_dir, exist_ok=True)
        log = self.root / f"{name}.log"
        cmd = [
            str(_BIN / "ray"),
            "start",
            "--block",
            f"--node-ip-address={ip}",
            f"--object-manager-port={ports['om']}",
            f"--node-manager-port={ports['nm']}",
            f"--dashboard-agent-listen-port={ports['agent']}",
            f"--dashboard-agent-grpc-port={ports['agent_grpc']}",
            f"--runtime-env-agent-port={ports['rte']}",
            f"--metrics-export-port={ports['metrics']}",
            f"--object-store-memory={self.object_store_mb * 1024 * 1024}",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
            *args,
        ]
        with open(log, "wb") as fh:
            proc = subprocess.Popen(
                cmd, env=self.env(), stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
            )
        return RayNode(ip=ip, proc=proc, log=log, temp_dir=temp_dir, ports=ports)

    @staticmethod
    def _ports(*extra: str) -> dict[str, int]:
        # Distinct ports: the kernel may hand out a just-closed port again, and Ray refuses to
        # start a node whose components were given the same port ("used by other components").
        names = ("om", "nm", "agent", "agent_grpc", "rte", "metrics", *extra)
        taken: set[int] = set()
        while len(taken) < len(names):
            taken.add(free_port())
        return dict(zip(names, sorted(taken)))

    def start_head(self, timeout_s: float = 90.0) -> LoopbackRayCluster:
        ports = self._ports("gcs", "dash", "client")
        args = [
            "--head",
            f"--port={ports['gcs']}",
            f"--num-cpus={int(self.head_cpus)}",
            f"--ray-client-server-port={ports['client']}",
            f"--include-dashboard={'true' if self.dashboard else 'false'}",
        ]
        if self.dashboard:
            args += [f"--dashboard-host={self.head_ip}", f"--dashboard-port={ports['dash']}"]
        if self.system_config:
            args.append(f"--system-config={json.dumps(self.system_config)}")
        self.head = self._start(self.head_ip, args, "head", ports)
        self._wait(lambda: self._nodes_alive() >= 1, timeout_s, self.head, "head")
        if self.dashboard:
            self._wait(self._dashboard_up, timeout_s, self.head, "dashboard")
        return self

    def add_worker(
        self,
        num_cpus: int = 1,
        resources: dict[str, float] | None = None,
        wait: bool = True,
        timeout_s: float = 60.0,
        attempts: int = 2,
    ) -> RayNode:
        """Start a worker raylet on the next free loopback address (127.0.0.3, .4, ...).

        On a loaded machine ``ray start`` can give up on its own start-up timeout: it is
        tried ``attempts`` times.
        """
        for attempt in range(attempts):
            # A fresh address when one is left (a lost node's address is slow to reuse), else a free one.
            ips = [f"127.0.0.{i}" for i in range(3, 10) if f"127.0.0.{i}" != self.head_ip]
            ever = {w.ip for w in self.workers}
            busy = {w.ip for w in self.workers if w.alive()}
            ip = next((i for i in ips if i not in ever), None) or next(i for i in ips if i not in busy)
            before = self._nodes_alive()
            args = [f"--address={self.address}", f"--num-cpus={int(num_cpus)}"]
            if resources:
                args.append(f"--resources={json.dumps(resources)}")
            node = self._start(ip, args, f"worker-{ip}-{attempt}", self._ports())
            self.workers.append(node)
            if not wait:
                return node
            try:
                self._wait(
                    lambda before=before: self._nodes_alive() > before, timeout_s, node, f"worker {ip}"
                )
                return node
            except RuntimeError:
                node.stop()
                if attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    def kill_raylet(self, node: RayNode) -> None:
        """SIGKILL a worker node's raylet (a lost node); its ``ray start`` then stops the rest."""
        pid = node.raylet_pid()
        if pid is None:
            raise RuntimeError(f"no raylet under ray start pid {node.proc.pid}")
        os.kill(pid, signal.SIGKILL)

    def _nodes_alive(self) -> int:
        """Alive nodes according to the GCS, asked from a subprocess with the cluster's environment
        (token auth settings are read per process, so the caller's own Ray is left alone)."""
        code = (
            "from ray._raylet import GcsClient\n"
            f"c = GcsClient(address={self.address!r})\n"
            "print(sum(1 for n in c.get_all_node_info(timeout=5).values() if n.state == 0))"
        )
        try:
            r = subprocess.run(
                [sys.executable, "-c", code], env=self.env(), capture_output=True, text=True, timeout=30
            )
            return int(r.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError, subprocess.TimeoutExpired):
            return 0

    def request(self, path: str) -> urllib.request.Request:
        """An authenticated dashboard request for ``path``."""
        return urllib.request.Request(
            f"{self.dashboard_url}{path}", headers={"Authorization": f"Bearer {self.token}"}
        )

    def _dashboard_up(self) -> bool:
        try:
            with urllib.request.urlopen(self.request("/api/version"), timeout=2):
                return True
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False

    def _wait(self, cond: Any, timeout_s: float, node: RayNode, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not node.alive():
                raise RuntimeError(
                    f"{what}: ray start exited {node.proc.returncode}: {node.log.read_text()[-3000:]}"
                )
            if cond():
                return
            time.sleep(0.5)
        raise RuntimeError(f"{what} did not come up in {timeout_s:g}s: {node.log.read_text()[-3000:]}")

    def stop(self) -> None:
        """Stop every node this object started (workers first), then remove its files."""
        for node in reversed(self.workers):
            node.stop()
        if self.head is not None:
            self.head.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LoopbackRayCluster:
        return self.start_head()

    def __exit__(self, *exc: object) -> None:
        self.stop()
