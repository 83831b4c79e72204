"""What a run reports: TensorBoard scalars (and the same to wandb when ``log.wandb.enabled``), a
per-step jsonl record, and a console progress line.

Only rank 0 writes. Values arrive already reduced over ranks (the loop does the collectives), so
this module does no communication.

``RUN/metrics.jsonl`` holds one line per optimiser step (step, loss, every loss term, lr, whether it
was skipped, and its wall seconds ``step_s``, which is what a throughput or sizing estimate needs).
On resume it is cut back to the checkpoint's step before appending (the cut lines are appended to
``metrics.jsonl.cut``, never thrown away: a resume that fell back past a damaged checkpoint must
not erase the record of the steps it lost), and TensorBoard is told to purge later events, so an
interrupted-and-resumed run leaves the same steps and losses as an uninterrupted one (the
exact-resume tests compare them).
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from powerclip.atomic import write_text_atomic
from powerclip.config import WandbConfig


def peak_memory_mb(device: torch.device) -> float:
    """CUDA peak allocated memory, or this process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class RunLogger:
    """Rank 0's sinks. It is also the ``writer`` the periodic evaluation logs to (``add_scalar`` /
    ``flush``), so every scalar reaches TensorBoard and wandb alike."""

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int | None, wandb: WandbConfig | None = None,
                 config: dict[str, Any] | None = None) -> None:
        self.enabled = enabled
        self.metrics_path = run_dir / "metrics.jsonl"
        self.tb = None
        self.wandb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._truncate(resume_step or 0)
        if wandb is not None and wandb.enabled:
            from powerclip.train.wandb_log import WandbSink

            self.wandb = WandbSink(wandb, run_dir, config or {})
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=None if resume_step is None else resume_step + 1)
        self._jsonl = open(self.metrics_path, "a")
        self._t0 = time.monotonic()  # elapsed time shown on the console: immune to wall-clock steps

    def _truncate(self, keep_upto: int) -> None:
        """Drop records after ``keep_upto`` (steps a killed run did past its last checkpoint)."""
        if not self.metrics_path.exists():
            return
        kept, cut = [], []
        for line in self.metrics_path.read_bytes().decode("utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by kill -9
                cut.append(line)
                continue
            step = rec.get("step") if isinstance(rec, dict) else None
            if not isinstance(step, int) or isinstance(step, bool):  # not a record of ours: kept aside too
                cut.append(line)
                continue
            (kept if step <= keep_upto else cut).append(line)
        if not cut:
            return
        with open(self.metrics_path.with_name(self.metrics_path.name + ".cut"), "a") as f:
            f.write("".join(x + "\n" for x in cut))
            f.flush()
            os.fsync(f.fileno())
        write_text_atomic(self.metrics_path, "".join(x + "\n" for x in kept))

    def record(self, step: int, rec: dict[str, Any]) -> None:
        """One jsonl line per step (flushed: a killed run keeps what it logged)."""
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **rec}) + "\n")
        self._jsonl.flush()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.tb is None:
            return
        for name, v in values.items():
            if v is not None and not (isinstance(v, float) and math.isnan(v)):
                self.tb.add_scalar(name, v, step)
        if self.wandb is not None:
            self.wandb.log(step, values)

    def add_scalar(self, name: str, value: float, step: int) -> None:
        """One scalar to every sink (SummaryWriter's signature)."""
        self.scalars(step, {name: value})

    def flush(self) -> None:
        if self.tb is not None:
            self.tb.flush()

    def console(self, step: int, total: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        elapsed = time.monotonic() - self._t0
        parts = [f"step {step}/{total}", f"loss {values.get('loss/total', float('nan')):.4f}",
                 f"lr {values.get('optim/lr', 0.0):.3g}",
                 f"scale {values.get('train/logit_scale', float('nan')):.2f}",
                 f"{values.get('perf/samples_per_s', 0.0):.1f} samples/s",
                 f"data {100 * values.get('perf/data_wait_frac', 0.0):.0f}%",
                 f"mem {values.get('perf/peak_mem_mb', 0.0):.0f}MB", f"{elapsed:.0f}s"]
        skipped = values.get("train/skipped_steps", 0)
        if skipped:
            parts.append(f"skipped steps {int(skipped)}")
        print(" | ".join(parts), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
        if self.wandb is not None:
            self.wandb.close()
        if self.enabled:
            self._jsonl.close()
