"""Test-only shard writers that kill their worker process once, mid-shard.

Selected with ``shards.format=crash_writer:CrashOnceTFRecordWriter`` (or
``...:CrashOnceWebDatasetWriter``): the ``tests`` directory is on the driver's
``sys.path`` under pytest, and Ray hands the driver's ``sys.path`` to the
workers of a local instance, so the actors import this module too.

``OIOD_TEST_CRASH_ONCE=IMAGE_ID:MARKER_PATH`` (forwarded to the actors with
``ray.forward_env``) makes the process exit with ``os._exit`` (no cleanup, no
exception: like a killed pod) when the writer reaches IMAGE_ID, if
MARKER_PATH does not exist yet; the marker is written first, so it happens
once. The shard is then half-written in memory and never committed.
"""

from __future__ import annotations

import os

from openimages_od.pipeline.writers import Sample
from openimages_od.pipeline.writers.tfrecord import TFRecordShardWriter
from openimages_od.pipeline.writers.webdataset import WebDatasetShardWriter

CRASH_ENV = "OIOD_TEST_CRASH_ONCE"


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
