"""The CPU accounting behind ``pipeline_bench.py --profile`` (benchmarks/cpuprof.py)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import cpuprof


def _spin(seconds: float) -> None:
    end = time.thread_time() + seconds
    x = 0
    while time.thread_time() < end:
        x += 1


def test_sampler_charges_cpu_to_the_busy_stack_and_nothing_to_waiting_threads(tmp_path: Path) -> None:
    sampler = cpuprof.StackSampler(str(tmp_path), hz=500)
    stop = threading.Event()
    sleeper = threading.Thread(target=stop.wait, name="sleeper")
    sleeper.start()
    sampler.start()
    busy = threading.Thread(target=_spin, args=(0.6,), name="oiod-cpu_0")
    busy.start()
    busy.join()
    stop.set()
    sleeper.join()
    time.sleep(0.05)
    sampler.stop()  # joins the sampler's thread and writes the report
    assert not sampler._thread.is_alive()
    charged: dict[tuple[str, str], float] = {}
    for (tname, label), cpu in sampler.cpu.items():
        charged[(tname, label)] = cpu
    spin = sum(v for (t, label), v in charged.items() if t == "oiod-cpu_0" and "_spin" in label)
    assert spin == pytest.approx(0.6, abs=0.1)  # the thread's CPU clock, not wall time
    assert sum(v for (t, _), v in charged.items() if t == "sleeper") < 0.02
    report = cpuprof.read_stacks(tmp_path)
    assert list(report) == [__import__("os").getpid()]


def test_stack_label_names_the_innermost_project_function() -> None:
    frames = sys._current_frames()
    label = cpuprof.stack_label(frames[threading.get_ident()])
    assert label.startswith("- | ")  # no openimages_od frame on this stack
    assert cpuprof._bucket("/x/site-packages/PIL/Image.py") == "PIL"
    assert cpuprof._bucket("/x/openimages_od/pipeline/shard.py") == "oiod:pipeline.shard"
    assert cpuprof._bucket("/usr/lib/python3.11/asyncio/base_events.py") == "py:asyncio"


@pytest.mark.parametrize(
    ("title", "role"),
    [
        (
            "/v/ray/core/src/ray/raylet/raylet --raylet_socket_name=x --agent_command=python dashboard/agent.py",
            "raylet",
        ),
        ("/v/ray/core/src/ray/gcs/gcs_server --gcs_server_port=1", "gcs_server"),
        ("ray::ShardWorker.run", "actor"),
        ("ray::IDLE", "idle worker"),
        ("/v/bin/python /v/ray/_private/workers/default_worker.py --raylet-name=x", "ray worker"),
        ("/v/bin/python -u /v/ray/dashboard/agent.py --node-ip-address=1", "dashboard agent"),
        ("/v/bin/python bench.py --_run oiod --_port 1", "driver"),
    ],
)
def test_process_roles(title: str, role: str) -> None:
    assert cpuprof.process_role(title) == role


def test_tree_threads_add_up_to_the_process_cpu_and_breakdown_keeps_the_native_rest(tmp_path: Path) -> None:
    code = textwrap.dedent(
        """
        import threading, time
        def spin(s):
            end = time.thread_time() + s
            while time.thread_time() < end:
                pass
        t = threading.Thread(target=spin, args=(0.3,)); t.start(); spin(0.3); t.join()
        print("done", flush=True)
        time.sleep(30)
        """
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "done"
        p = psutil.Process(child.pid)
        tree = cpuprof.TreeThreads()
        tree.sample(child.pid, p.create_time())
        cpu = p.cpu_times()
        rows = tree.to_json()
    finally:
        child.kill()
        child.wait()
    # The spinner thread has ended: its CPU is no longer under /proc/<pid>/task, but the
    # process's own figure keeps it, and it is listed as "(ended threads)".
    total = sum(r[5] for r in rows)
    assert total == pytest.approx(cpu.user + cpu.system, abs=0.05)
    assert total >= 0.55
    ended = [r for r in rows if r[4] == "(ended threads)"]
    assert len(ended) == 1 and ended[0][5] == pytest.approx(0.3, abs=0.06)
    # No sampler report for that pid: its CPU is listed by native thread name.
    parts = cpuprof.breakdown(rows, {})
    assert sum(parts[rows[0][3]].values()) == pytest.approx(total)
    # With a report, the Python threads' share is the report's and the rest is "native".
    stacks = {child.pid: {"cpu": [["MainThread", "x", 0.25], ["cpuprof", "cpuprof", 0.01]]}}
    parts = cpuprof.breakdown(rows, stacks)[rows[0][3]]
    assert parts["main thread (Ray's task loop)\tx"] == pytest.approx(0.25)
    assert parts["the profiler's own thread\t"] == pytest.approx(0.01)
    assert parts["native threads (Ray core worker, gRPC; C++)\t"] == pytest.approx(total - 0.26)
