"""The driver's live progress bar for ``oiod prepare`` (no Ray: the scheduler feeds it)."""

from __future__ import annotations

import time

__all__ = ["ProgressBar"]


class ProgressBar:
    """Live progress of a prepare in the driver (rich, on stderr), or nothing when disabled.

    Args:
        enabled: ``ray.progress``.
        total_images: images of the shards to do (the bar's total).
        total_shards: shards to do.
    """

    def __init__(self, enabled: bool, total_images: int, total_shards: int) -> None:
        self.enabled = enabled
        self.t0 = time.monotonic()
        self.total_shards = total_shards
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("prepare"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("images"),
            TextColumn("{task.fields[rate]:>7.1f} img/s"),
            TextColumn("shards {task.fields[shards]}"),
            TextColumn("failed {task.fields[failed]}"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            refresh_per_second=4,
        )
        self.task = self.progress.add_task(
            "prepare", total=total_images, rate=0.0, shards=f"0/{total_shards}", failed=0
        )
        self.progress.start()

    def update(self, ok: int, failed: int, shards_done: int) -> None:
        if not self.enabled:
            return
        el = max(1e-6, time.monotonic() - self.t0)
        self.progress.update(
            self.task,
            completed=ok + failed,
            rate=(ok + failed) / el,
            shards=f"{shards_done}/{self.total_shards}",
            failed=failed,
        )

    def close(self) -> None:
        if self.enabled:
            self.progress.stop()
