"""Per-step metrics: one JSON line each in `metrics.jsonl`, TensorBoard scalars, optionally
Weights & Biases, and a console line every `console_interval` steps.

Only rank 0 writes. On resume, lines past the resumed step are dropped first, so the file always
describes one consistent history (the one the checkpoint continues).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

METRICS_FILE = "metrics.jsonl"

# (label, key, format) of the console progress line.
_CONSOLE = (
    ("step", "step", "{:.0f}"),
    ("reward", "reward_mean", "{:+.3f}"),
    ("acc", "accuracy", "{:.3f}"),
    ("loss", "loss", "{:.4f}"),
    ("+", "loss_pos", "{:.4f}"),
    ("-", "loss_neg", "{:.4f}"),
    ("|dlogp|", "logprob_diff_max", "{:.1e}"),
    ("initial eval", "initial_eval_accuracy", "{:.3f}"),
    ("eval", "eval_accuracy", "{:.3f}"),
    ("final eval", "final_eval_accuracy", "{:.3f}"),
    ("tok/s", "generation_tokens_per_s", "{:.0f}"),
    ("gpu GiB", "gpu_used_gib", "{:.1f}"),
    ("rss GiB", "cpu_rss_gib", "{:.2f}"),
)


class MetricsLogger:
    def __init__(self, run_dir: str | Path, enabled: bool, tensorboard: bool, total_steps: int, resume_step: int = 0,
                 console_interval: int = 1, wandb_run: dict | None = None):
        """`wandb_run`: keyword arguments of `wandb.init` (project, name, config), or None for no W&B."""
        self.enabled, self.total_steps, self.console_interval = enabled, total_steps, console_interval
        self.path = Path(run_dir) / METRICS_FILE
        self._writer = self._wandb = None
        self._started = time.perf_counter()
        self._start_step = resume_step
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _truncate_after(self.path, resume_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), purge_step=resume_step + 1)
        if wandb_run is not None:
            self._wandb = _start_wandb(run_dir, wandb_run)
        from rich.console import Console

        self._console = Console(highlight=False, soft_wrap=True)  # one line per record, also in log files

    def log(self, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        step = int(metrics["step"])
        with self.path.open("a") as handle:
            handle.write(json.dumps(metrics, sort_keys=True) + "\n")
        if self._writer is not None:
            for key, value in metrics.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._writer.add_scalar(key, value, step)
            self._writer.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in metrics.items() if k != "step"}, step=step)
        if step % self.console_interval and not any(key.startswith(("eval", "final_", "initial_")) for key in metrics):
            return
        parts = [f"{label} {fmt.format(metrics[key])}" for label, key, fmt in _CONSOLE if key in metrics]
        self._console.print(" | ".join(parts) + f" | eta {self._eta(step)}")

    def _eta(self, step: int) -> str:
        done = step - self._start_step
        if done <= 0:
            return "?"
        remaining = (time.perf_counter() - self._started) / done * (self.total_steps - step)
        return f"{int(remaining // 60)}m{int(remaining % 60):02d}s"

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._wandb is not None:
            self._wandb.finish()


def _start_wandb(run_dir: str | Path, init_kwargs: dict):
    """A W&B run (the optional `wandb` extra); resumed runs continue the same W&B run id."""
    try:
        import wandb
    except ImportError:
        raise ValueError("logging.wandb is true but wandb is not installed: pip install 'rift-megatron[wandb]'") from None
    id_file = Path(run_dir) / "wandb_run_id"
    run_id = id_file.read_text().strip() if id_file.exists() else wandb.util.generate_id()
    id_file.write_text(run_id + "\n")
    return wandb.init(id=run_id, resume="allow", dir=str(run_dir), **init_kwargs)


def _truncate_after(path: Path, step: int) -> None:
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []
