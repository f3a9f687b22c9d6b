"""Metrics sinks: JSONL (always), wandb (offline by default, no account needed), and a progress bar."""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

from sdft_ray.config import Config

# Never write credentials into logs or wandb configs.
_SECRET = re.compile(r"(key|token|secret|password)", re.IGNORECASE)


def redact(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: ("***" if _SECRET.search(str(k)) and v else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj


class MetricsLogger:
    def __init__(self, cfg: Config, total_steps: int, initial_step: int = 0, name: str = "metrics.jsonl") -> None:
        self.out = Path(cfg.train.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        # append: a resumed run continues the same file instead of replacing what was logged before
        self.file = open(self.out / name, "a", buffering=1)
        self._completions: Any = None  # completions.jsonl, opened at the first sample
        self.wandb = None
        if cfg.logging.wandb != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb = wandb.init(
                project=cfg.logging.project,
                name=cfg.logging.run_name or None,
                mode=cfg.logging.wandb,
                dir=str(self.out),
                config=redact(cfg.to_dict()),
                resume="allow",
                id=_run_id(self.out),
            )
        self.bar = None
        self.total = total_steps
        # a bar on a terminal; plain lines (every ~5% of the run) in job logs, where \r-redraws are noise
        self.lines_every = 0
        if cfg.logging.progress_bar and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=initial_step, desc=cfg.train.algo, dynamic_ncols=True)
        elif cfg.logging.progress_bar:
            self.lines_every = max(1, total_steps // 20)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        self.file.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log(row, step=step)
        # SFT has no KL (nan): show only what the run has
        shown = {
            k: f"{metrics[k]:.4g}"
            for k in ("loss", "kl", "tokens_per_s", "lag_mean")
            if k in metrics and math.isfinite(metrics[k])
        }
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(shown)
        elif self.lines_every and (step % self.lines_every == 0 or step == self.total):
            print(f"step {step}/{self.total} " + " ".join(f"{k}={v}" for k, v in shown.items()), flush=True)

    def completions(self, step: int, rows: list[dict[str, Any]]) -> None:
        """Sample completions of one step, one JSON line each, in completions.jsonl beside metrics.jsonl."""
        if not rows:
            return
        if self._completions is None:
            self._completions = open(self.out / "completions.jsonl", "a", buffering=1)
        for r in rows:
            self._completions.write(json.dumps({"step": step, **r}) + "\n")

    def event(self, kind: str, **fields: Any) -> None:
        """Non-step records (restarts, skips, checkpoints): same file, marked by ``event``."""
        self.file.write(json.dumps({"event": kind, **redact(fields)}) + "\n")

    def close(self) -> None:
        if self._completions is not None:
            self._completions.close()
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()
        self.file.close()


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _run_id(out: Path) -> str:
    f = out / ".wandb_run_id"
    if f.exists():
        return f.read_text().strip()
    import uuid

    rid = uuid.uuid4().hex[:8]
    f.write_text(rid)
    return rid
