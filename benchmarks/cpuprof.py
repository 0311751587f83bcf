"""CPU accounting for a whole process tree: per process, per thread, per Python stack.

Two parts, used by ``pipeline_bench.py --profile`` to say where prepare's CPU per
image goes:

* :class:`TreeThreads`: the reaping parent's view. It samples every thread of every
  descendant process from ``/proc`` (user + system time, the thread's ``comm`` and the
  process's title), so the native threads of Ray's daemons and of the actors' core
  workers (gRPC, io_context, ...) are counted, and the sums add up to the tree's CPU.
* :class:`StackSampler`: inside each Python process of the tree (started by the
  ``sitecustomize`` that :func:`sitecustomize_dir` writes, when ``OIOD_CPUPROF_DIR``
  is set). Every ``1/hz`` s it reads each Python thread's CPU clock
  (``pthread_getcpuclockid``) and charges the CPU the thread used since the previous
  sample half to the stack it was in then and half to the stack it is in now. That is CPU time, not wall time: a thread that
  waits for the GIL or for a core uses no CPU and is charged nothing, which a
  wall-clock sampler (py-spy) on an oversubscribed 2-core machine cannot tell apart.
  C code that releases the GIL (libjpeg in Pillow) is charged to the Python frame
  that called it. The sampler's own CPU is reported as ``cpuprof`` so it can be left out.

Neither part imports the project; the reports are JSON files the benchmark combines.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")


def stat_cpu(path: str) -> tuple[str, float]:
    """``(comm, user + system seconds)`` from a ``/proc/<pid>/stat`` or ``/proc/<pid>/task/<tid>/stat``."""
    with open(path) as fh:
        raw = fh.read()
    fields = raw.rsplit(")", 1)[1].split()
    return raw[raw.index("(") + 1 : raw.rindex(")")], (float(fields[11]) + float(fields[12])) / _TICK


# --------------------------------------------------------------------------- in-process stack sampler


def _bucket(filename: str) -> str:
    """Where a frame's code lives: ``oiod:<module>``, ``<site package>``, ``py:<stdlib module>``."""
    f = filename.replace("\\", "/")
    if "/openimages_od/" in f:
        return "oiod:" + f.rsplit("/openimages_od/", 1)[1].removesuffix(".py").replace("/", ".")
    if "site-packages/" in f:
        return f.rsplit("site-packages/", 1)[1].split("/", 1)[0].removesuffix(".py")
    if f.startswith("<"):
        return f
    parts = f.rsplit("/lib/python", 1)
    if len(parts) == 2 and "/" in parts[1]:
        return "py:" + parts[1].split("/", 2)[1].removesuffix(".py")
    return "other:" + f.rsplit("/", 1)[-1]


def stack_label(frame: object) -> str:
    """``<innermost project function> | <package of the innermost frame>.<its function>``."""
    leaf = frame
    own = None
    f = frame
    while f is not None:
        code = f.f_code  # type: ignore[attr-defined]
        if own is None and "/openimages_od/" in code.co_filename:
            own = f"{_bucket(code.co_filename)}.{code.co_name}"
        f = f.f_back  # type: ignore[attr-defined]
    code = leaf.f_code  # type: ignore[attr-defined]
    where = f"{_bucket(code.co_filename)}.{code.co_name}"
    if own is None:
        return f"- | {where}"
    return own if where == own else f"{own} | {where}"


class StackSampler:
    """Charges each Python thread's CPU clock deltas to its current stack (see the module doc)."""

    def __init__(self, out_dir: str, hz: float = 1000.0) -> None:
        self.path = Path(out_dir) / f"{os.getpid()}.json"
        self.period = 1.0 / hz
        self.cpu: dict[tuple[str, str], float] = defaultdict(float)
        self._last: dict[int, float] = {}
        self._clock: dict[int, int] = {}
        self._label: dict[int, str] = {}
        self._thread = threading.Thread(target=self._run, name="cpuprof", daemon=True)
        self._stop = threading.Event()

    def start(self) -> None:
        import atexit

        self._thread.start()
        atexit.register(self.stop)

    def stop(self) -> None:
        """Stop sampling and write the report (at exit, or when a caller is done)."""
        import atexit

        atexit.unregister(self.stop)
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        self.dump()

    def _sample(self, me: int) -> float:
        """One sample of every Python thread; returns the CPU they used since the last one."""
        names = {t.ident: t.name for t in threading.enumerate()}
        used = 0.0
        for ident, frame in sys._current_frames().items():
            if ident == me:
                continue
            try:
                clock = self._clock.get(ident)
                if clock is None:
                    clock = self._clock[ident] = time.pthread_getcpuclockid(ident)
                now = time.clock_gettime(clock)
            except (OSError, ValueError):
                continue  # the thread ended between the listing and the read
            before = self._last.get(ident)
            self._last[ident] = now
            name = names.get(ident, "?")
            label = stack_label(frame)
            if before is None:  # CPU from before this thread was first seen (start-up)
                self.cpu[(name, "(before first sample)")] += now
            elif now > before:
                # The CPU of the interval is split between the stacks at its two ends: a
                # thread sampled just after a hand-off (often preempted right there on a
                # busy machine) must not be charged all of the work it did before it.
                half = (now - before) / 2
                self.cpu[(name, self._label.get(ident, label))] += half
                self.cpu[(name, label)] += half
                used += now - before
            self._label[ident] = label
        return used

    def dump(self) -> None:
        data = {
            "pid": os.getpid(),
            "argv": sys.argv[:3],
            "cpu": [[t, label, s] for (t, label), s in self.cpu.items()],
        }
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.path)

    def _run(self) -> None:
        me = threading.get_ident()
        next_dump = time.monotonic() + 0.5
        pause = self.period
        while not self._stop.wait(pause):
            try:
                # Back off (up to 20 ms) while the process is idle, so idle workers cost nothing.
                pause = self.period if self._sample(me) > 0 else min(0.02, pause * 2)
                self.cpu[("cpuprof", "cpuprof")] = time.thread_time()
                if time.monotonic() >= next_dump:
                    self.dump()
                    next_dump = time.monotonic() + 0.5
            except Exception:  # never take the profiled process down
                pass


def sitecustomize_dir(root: Path) -> Path:
    """A directory holding a ``sitecustomize.py`` that starts :class:`StackSampler` in every
    Python process started with it on ``PYTHONPATH`` and ``OIOD_CPUPROF_DIR`` set."""
    root.mkdir(parents=True, exist_ok=True)
    here = Path(__file__).resolve().parent
    (root / "sitecustomize.py").write_text(
        "import os, sys\n"
        "_argv = open('/proc/self/cmdline', 'rb').read().decode(errors='replace')\n"
        "if os.environ.get('OIOD_CPUPROF_DIR') and ('default_worker.py' in _argv or '--_run' in _argv):\n"
        f"    sys.path.insert(0, {str(here)!r})\n"
        "    import cpuprof\n"
        "    cpuprof.StackSampler(os.environ['OIOD_CPUPROF_DIR']).start()\n"
        "    sys.path.pop(0)\n"
    )
    return root


def read_stacks(folder: Path) -> dict[int, dict]:
    """The samplers' reports in ``folder``, by pid."""
    out = {}
    for p in folder.glob("[0-9]*.json"):
        try:
            d = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        out[d["pid"]] = d
    return out


# --------------------------------------------------------------------------- the tree's threads, from /proc


def process_role(title: str) -> str:
    """A short role for a process of the benchmark's tree from its title / command line."""
    t = title.strip()
    exe = t.split(" ", 1)[0].rsplit("/", 1)[-1]
    if exe in ("raylet", "gcs_server"):  # the raylet's arguments name the agents it starts
        return exe
    for key, role in (
        ("ray::ShardWorker", "actor"),
        ("ray::IDLE", "idle worker"),
        ("default_worker.py", "ray worker"),
        ("gcs_server", "gcs_server"),
        ("dashboard/agent.py", "dashboard agent"),
        ("dashboard/dashboard.py", "dashboard"),
        ("runtime_env/agent", "runtime_env agent"),
        ("log_monitor.py", "log_monitor"),
        ("monitor.py", "monitor"),
        ("--_reap", "reaper"),
        ("--_run", "driver"),
    ):
        if key in t:
            return role
    if t.startswith("ray::"):
        return t.split()[0]
    return t.split()[0].rsplit("/", 1)[-1] if t else "?"


class TreeThreads:
    """Last-seen CPU of every thread of the tree, by (pid, start time, tid)."""

    def __init__(self) -> None:
        # (pid, create time) -> role; (pid, create time, tid) -> (comm, cpu s)
        self.roles: dict[tuple[int, float], str] = {}
        self.threads: dict[tuple[int, float, int], tuple[str, float]] = {}
        # (pid, create time) -> the process's own user + system (its ended threads included)
        self.procs: dict[tuple[int, float], float] = {}

    def sample(self, pid: int, create_time: float) -> None:
        key = (pid, create_time)
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                title = fh.read().replace(b"\0", b" ").decode(errors="replace")
            role = process_role(title)
            # A Ray worker is "ray worker" (its command line), then "ray::IDLE" until it
            # becomes an actor: keep the most specific role seen.
            if self.roles.get(key) in (None, "ray worker", "idle worker", "?"):
                self.roles[key] = role
            self.procs[key] = stat_cpu(f"/proc/{pid}/stat")[1]
            for tid in os.listdir(f"/proc/{pid}/task"):
                try:
                    self.threads[(pid, create_time, int(tid))] = stat_cpu(f"/proc/{pid}/task/{tid}/stat")
                except OSError:
                    continue  # the thread ended between the listing and the read
        except OSError:
            pass  # the process is gone: its last sample stands

    def to_json(self) -> list:
        """``[pid, create time, tid, role, thread name, cpu s]`` rows; a process's threads that
        ended before their last sample are one more row, ``tid`` 0, ``(ended threads)``."""
        rows = [
            [pid, ct, tid, self.roles.get((pid, ct), "?"), comm, cpu]
            for (pid, ct, tid), (comm, cpu) in self.threads.items()
        ]
        seen: dict[tuple[int, float], float] = defaultdict(float)
        for pid, ct, _tid, _role, _comm, cpu in rows:
            seen[(pid, ct)] += cpu
        for (pid, ct), cpu in self.procs.items():
            if cpu - seen[(pid, ct)] > 0:
                rows.append(
                    [pid, ct, 0, self.roles.get((pid, ct), "?"), "(ended threads)", cpu - seen[(pid, ct)]]
                )
        return rows


# --------------------------------------------------------------------------- combining the two


def _thread_group(comm: str) -> str:
    """Native thread names with a counter suffix folded (``grpcpp_sync_ser`` etc. stay)."""
    return comm.rstrip("0123456789").rstrip("-_ ") or comm


def breakdown(threads: list, stacks: dict[int, dict]) -> dict[str, dict[str, float]]:
    """CPU seconds by role -> ``"<thread group>\t<stack label>"``. A sampled Python process's
    CPU is split into its Python threads' stacks (from its sampler) and the native threads
    (the rest of the process's /proc CPU); other processes by native thread name."""
    per_proc: dict[int, float] = defaultdict(float)
    roles: dict[int, str] = {}
    native: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for pid, _ct, _tid, role, comm, cpu in threads:
        per_proc[pid] += cpu
        roles[pid] = role
        native[pid][_thread_group(comm)] += cpu
    out: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for pid, total in per_proc.items():
        role = roles[pid]
        st = stacks.get(pid)
        if st is None:
            for group, cpu in native[pid].items():
                out[role][f"thread {group}\t"] += cpu
            continue
        py = 0.0
        for tname, label, cpu in st["cpu"]:
            if tname == "cpuprof":
                out[role]["the profiler's own thread\t"] += cpu
            else:
                out[role][f"{py_thread_group(tname)}\t{label}"] += cpu
            py += cpu
        out[role]["native threads (Ray core worker, gRPC; C++)\t"] += max(0.0, total - py)
    return out


def py_thread_group(name: str) -> str:
    """A Python thread's group in a prepare actor / driver, by its name."""
    for prefix, group in (
        ("oiod-cpu", "CPU pool (oiod-cpu: verify, decode, encode, records)"),
        ("AsyncIO Thread", "event loop (Ray's AsyncIO Thread: HTTP, scheduling of the shard)"),
        ("asyncio_", "default executor (asyncio_N: storage and image cache I/O)"),
        ("ThreadPoolExecutor", "default executor (asyncio_N: storage and image cache I/O)"),
        ("MainThread", "main thread (Ray's task loop)"),
    ):
        if name.startswith(prefix):
            return group
    return _thread_group(name)
