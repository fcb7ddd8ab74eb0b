"""Where training figures go: one console line per step, `metrics.jsonl`, and W&B when enabled.

Only rank 0 creates a RunLogger that writes; other ranks get one that does nothing.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from config import Config


# A stage's own figures, shown after the loss when present (all of them go to metrics.jsonl).
def format_step_line(step: int, max_steps: int, m: dict, figures: dict[str, str]) -> str:
    """One line per step; `figures` (the stage's): the figures beyond the loss it shows, name -> format."""
    parts = [f"step {step:>{len(str(max_steps))}}/{max_steps}", f"loss {m['loss']:.4f}"]
    parts += [form.format(m[key]) for key, form in figures.items() if key in m]
    parts += [f"lr {m['lr']:.2e}", f"grad {m['grad_norm']:.3f}", f"{m['tokens_per_s']:,.0f} tok/s",
              "mfu ?" if m.get("mfu") is None else f"mfu {100 * m['mfu']:.1f}%",
              f"{1000 * m['step_time_s']:.0f} ms (data {100 * m['data_share']:.0f}%)"]
    return " | ".join(parts)


class RunLogger:
    def __init__(self, cfg: Config, enabled: bool, resume_step: int = 0, wandb_run_id: Optional[str] = None,
                 initial_step: int = 0):
        self.enabled = enabled
        self.cfg = cfg
        self.path = cfg.run_path / "metrics.jsonl"
        self.wandb = None
        self.wandb_run_id = wandb_run_id
        self.bar = None
        self.initial_step = initial_step
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._drop_records_after(resume_step)
        if cfg.wandb_enabled and cfg.wandb_mode != "disabled":
            self._start_wandb()

    def start_progress(self) -> None:
        """The bar starts when the first step does, so its clock shows training time, not start-up."""
        if self.enabled:
            self.bar = tqdm(total=self.cfg.max_steps, initial=self.initial_step, desc="train", unit="step",
                            dynamic_ncols=True, mininterval=1.0)

    def _drop_records_after(self, step: int) -> None:
        """A run resumed from step N continues the curve from N: later records (from the part of
        the interrupted run that was never checkpointed) would otherwise appear twice."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut off by a crash
        self.path.write_text("".join(k + "\n" for k in kept))

    def _start_wandb(self) -> None:
        import wandb

        # Resuming passes the saved run id, so W&B continues the same run with the same step axis.
        self.wandb = wandb.init(
            project=self.cfg.wandb_project, name=self.cfg.wandb_run_name or self.cfg.run_path.name,
            id=self.wandb_run_id, resume="allow", mode=self.cfg.wandb_mode, config=self.cfg.to_dict(),
            dir=str(self.cfg.run_path),
        )
        self.wandb_run_id = self.wandb.id

    def log(self, step: int, metrics: dict, line: Optional[str] = None) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **metrics}
        with open(self.path, "a") as f:
            f.write(json.dumps(record, allow_nan=True) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)},
                           step=step)
        if line:
            self.print(line)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def print(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            tqdm.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()
