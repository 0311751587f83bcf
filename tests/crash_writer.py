"""Test-only shard writers that kill their worker process once, mid-shard.

Selected with ``shards.format=crash_writer:CrashOnceTFRecordWriter`` (or
``...:CrashOnceWebDatasetWriter``, see :func:`crash_sets`). The ``tests``
directory is on the driver's ``sys.path`` under pytest but not on the Ray
workers' (the session's raylet started before any test ran), so :func:`arm`
puts it on ``PYTHONPATH`` and the config forwards that to the actors with
``ray.forward_env``, the way a project ships its own writer to its workers.

``OIOD_TEST_CRASH_ONCE=IMAGE_ID:MARKER_PATH`` (forwarded the same way) makes
the process exit with ``os._exit`` (no cleanup, no exception: like a killed
pod) when the writer reaches IMAGE_ID, if MARKER_PATH does not exist yet; the
marker is written first, so it happens once. The shard is then half-written
in memory and never committed.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from openimages_od.pipeline.writers import Sample
from openimages_od.pipeline.writers.tfrecord import TFRecordShardWriter
from openimages_od.pipeline.writers.webdataset import WebDatasetShardWriter

CRASH_ENV = "OIOD_TEST_CRASH_ONCE"
TESTS_DIR = Path(__file__).resolve().parent


def crash_sets(writer: str = "CrashOnceTFRecordWriter") -> list[str]:
    """The ``--set`` overrides that select a crashing writer and forward what its actors need."""
    return [f"shards.format=crash_writer:{writer}", f"ray.forward_env=[{CRASH_ENV},PYTHONPATH]"]


def arm(monkeypatch: pytest.MonkeyPatch, image_id: str, marker: Path) -> None:
    """Crash once at ``image_id``; make this module importable by the actors of the next prepare."""
    monkeypatch.setenv(CRASH_ENV, f"{image_id}:{marker}")
    paths = [str(TESTS_DIR), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(dict.fromkeys(paths)))


def crash_if_victim(image_id: str) -> None:
    target, _, marker = os.environ.get(CRASH_ENV, "").partition(":")
    if target and target == image_id and marker and not os.path.exists(marker):
        with open(marker, "w") as fh:
            fh.write(f"{os.getpid()}\n")
        os._exit(17)


class CrashOnceTFRecordWriter(TFRecordShardWriter):
    """The TFRecord writer (same bytes), killing its process once at the victim image."""

    def write(self, sample: Sample) -> None:
        crash_if_victim(sample.image_id)
        super().write(sample)


class CrashOnceWebDatasetWriter(WebDatasetShardWriter):
    """The WebDataset writer (same bytes), killing its process once at the victim image."""

    def write(self, sample: Sample) -> None:
        crash_if_victim(sample.image_id)
        super().write(sample)
