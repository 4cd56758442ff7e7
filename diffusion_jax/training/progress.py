"""Training progress: the console bar (step, loss, images/s, ETA), TensorBoard scalars and
metrics.jsonl lines, and the two throughputs the summary reports."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from typing import Mapping

import numpy as np
from etils import epath

from diffusion_jax import checkpoint

log = logging.getLogger("diffusion_jax.train")




class Progress:
    """Console progress (tqdm: step, loss, images/s, ETA), TensorBoard scalars and
    metrics.jsonl. Two throughputs: `images_per_second` over wall time (evals, sample grids
    and checkpoints included) and `step_images_per_second` over the train steps alone; the
    first logged interval, which holds the compile, counts in neither."""

    def __init__(self, run, stage: str, start: int, total: int, batch_size: int):
        from tqdm import tqdm

        self.run, self.stage, self.batch_size = run, stage, batch_size
        self.bar = tqdm(total=total, initial=start, desc=f"{stage}", unit="step",
                        disable=not run.is_main, mininterval=2.0, dynamic_ncols=True)
        self.last_time, self.last_step = time.perf_counter(), start
        self.compiled = False
        self.outside = 0.0  # seconds of this interval spent outside train steps
        self.timed_steps, self.timed_seconds, self.timed_step_seconds = 0, 0.0, 0.0

    @contextlib.contextmanager
    def outside_steps(self):
        """Time spent in evals, sample grids and checkpoints, kept out of step throughput."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.outside += time.perf_counter() - start

    def log(self, step: int, pending: list, iterator) -> None:
        values = {k: float(np.mean([float(m[k]) for m in pending])) for k in pending[-1]}
        now = time.perf_counter()
        steps = step - self.run.first_step(self.stage) - self.last_step
        seconds, step_seconds = now - self.last_time, now - self.last_time - self.outside
        if self.compiled:
            self.timed_steps += steps
            self.timed_seconds += seconds
            self.timed_step_seconds += step_seconds
        self.compiled, self.outside = True, 0.0
        values["step_seconds"] = step_seconds / max(steps, 1)
        values["images_per_second"] = self.batch_size * steps / max(seconds, 1e-9)
        values["step_images_per_second"] = self.batch_size * steps / max(step_seconds, 1e-9)
        self.last_time, self.last_step = now, step - self.run.first_step(self.stage)
        self.run.scalars(step, values, f"{self.stage}/train")
        self.bar.update(steps)
        self.bar.set_postfix(loss=f"{values['loss']:.4f}", img_s=f"{values['images_per_second']:.0f}")
        self.record(step, values)
        log.debug("%s step %d %s skipped=%s", self.stage, step, values, getattr(iterator, "stats", None))

    def record(self, step: int, values: Mapping[str, float]) -> None:
        """One metrics.jsonl line: the curves as JSON, easy to diff and plot."""
        if self.run.is_main:
            _append_line(self.run.workdir / "metrics.jsonl",
                         json.dumps({"stage": self.stage, "step": step, **values}) + "\n")

    def throughput(self) -> dict[str, float]:
        if not self.timed_steps:
            return {"images_per_second": 0.0, "step_images_per_second": 0.0}
        images = self.batch_size * self.timed_steps
        return {"images_per_second": round(images / self.timed_seconds, 1),
                "step_images_per_second": round(images / self.timed_step_seconds, 1)}

    def close(self) -> None:
        self.bar.close()


def _append_line(path: epath.Path, line: str) -> None:
    if checkpoint.is_remote(path):  # a GCS object cannot grow: gcsfs opens "a" as "w"
        path.write_text((path.read_text() if path.exists() else "") + line)
    else:
        with open(path, "a") as f:
            f.write(line)
