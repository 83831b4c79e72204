"""Weights & Biases as a second sink for the scalars TensorBoard gets (``log.wandb``).

wandb is an optional extra: it is imported here, inside ``WandbSink``, only when a rank-0 run has
``log.wandb.enabled``; a run without it never imports it (nor does timm under open_clip: see
``powerclip/__init__.py``). A run that asks for it without the package fails at start with
one line naming the extra.

Resuming by id: the wandb run id is ``log.wandb.id`` or, when null, the one this run folder
recorded on its first start (``RUN/wandb_run_id``), so a resumed or requeued run continues the same
wandb run (``resume="allow"``). wandb keeps a step's values once written: the steps a killed run
logged after its last checkpoint are not rewritten by the resumed run (wandb warns and drops the
repeated steps); TensorBoard and ``metrics.jsonl`` are cut back, wandb is not.
"""

from __future__ import annotations

import math
import secrets
from pathlib import Path
from typing import Any

from powerclip.atomic import write_text_atomic
from powerclip.config import ConfigError, WandbConfig

RUN_ID_FILE = "wandb_run_id"


def run_id(cfg: WandbConfig, run_dir: Path) -> str:
    """``log.wandb.id``, else the id recorded in the run folder, else a new random one (recorded)."""
    path = run_dir / RUN_ID_FILE
    if cfg.id:
        return cfg.id
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    rid = secrets.token_hex(6)  # wandb's ids: lowercase letters and digits
    write_text_atomic(path, rid + "\n")
    return rid


class WandbSink:
    """One wandb run for this training run; ``log`` takes the same (step, {name: value}) as TensorBoard."""

    def __init__(self, cfg: WandbConfig, run_dir: Path, config: dict[str, Any]) -> None:
        try:
            import wandb
        except ImportError:
            raise ConfigError("log.wandb.enabled=true but wandb is not installed: pip install 'powerclip[wandb]' "
                              "(or set log.wandb.enabled=false)") from None
        run_dir.mkdir(parents=True, exist_ok=True)
        rid = run_id(cfg, run_dir)
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.name or run_dir.name,
                              tags=list(cfg.tags), id=rid, resume="allow", config=config, dir=str(run_dir),
                              mode=cfg.mode)

    def log(self, step: int, values: dict[str, float]) -> None:
        clean = {k: float(v) for k, v in values.items()
                 if v is not None and not (isinstance(v, float) and math.isnan(v))}
        if clean:
            self.run.log(clean, step=step)

    def close(self) -> None:
        self.run.finish()
