"""Metrics: a JSONL log in the run folder, optional TensorBoard/MLflow/W&B sinks, and a progress bar."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ..config import flatten_dotted


class MetricsLog:
    """Appends one JSON object per line; on resume, drops lines past the checkpoint's step."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = Path(path)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step
                    and not json.loads(line).get("final")]
            self.path.write_text("".join(k + "\n" for k in kept))
        self._fh = open(self.path, "a")

    def write(self, record: dict) -> None:
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


class NullLog:
    """MetricsLog's interface writing nothing: the log of ranks other than 0 in a multi-process run."""

    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class Sinks:
    """Forward scalar metrics to the trackers the user named; each is imported only when asked for."""

    def __init__(self, names: list[str], run_dir: Path, config: dict):
        self._writers = []
        for name in names:
            try:
                if name == "tensorboard":
                    from torch.utils.tensorboard import SummaryWriter

                    w = SummaryWriter(str(Path(run_dir) / "tensorboard"))
                    self._writers.append(lambda m, s, w=w: [w.add_scalar(k, v, s) for k, v in m.items()])
                elif name == "mlflow":
                    import mlflow

                    mlflow.start_run(run_name=Path(run_dir).name)
                    mlflow.log_params({k: str(v)[:250] for k, v in flatten_dotted(config).items()})
                    self._writers.append(lambda m, s: mlflow.log_metrics(m, step=s))
                elif name == "wandb":
                    import wandb

                    wandb.init(project="tunekit", name=Path(run_dir).name, config=config, dir=str(run_dir))
                    self._writers.append(lambda m, s: wandb.log(m, step=s))
            except ImportError:
                raise ImportError(f"train.report_to includes {name!r} but the package is not installed: "
                                  f"pip install {name}") from None

    def log(self, metrics: dict, step: int) -> None:
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "step"}
        for write in self._writers:
            write(scalars, step)




class Progress:
    """tqdm bar with step, loss, tokens/s and ETA on a terminal; plain lines every few steps otherwise."""

    def __init__(self, total: int, initial: int, enabled: bool, desc: str = "train"):
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.total = total
        self._bar = None
        self._t0, self._s0 = time.perf_counter(), initial
        if enabled and self.tty:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)

    def update(self, step: int, loss: float, tokens_per_s: float, lr: float, mfu: float | None = None,
               peak_gib: float | None = None) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            extra = {"mfu": f"{100 * mfu:.0f}%"} if mfu is not None else {}
            if peak_gib is not None:
                extra["peak"] = f"{peak_gib:.2f}GiB"
            self._bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", **extra, lr=f"{lr:.2e}")
            return
        every = max(1, self.total // 20)
        if step % every == 0 or step == self.total:
            done = step - self._s0
            elapsed = time.perf_counter() - self._t0
            eta = elapsed / done * (self.total - step) if done else float("nan")
            extra_text = f"  MFU {100 * mfu:.0f}%" if mfu is not None else ""
            extra_text += f"  peak {peak_gib:.2f} GiB" if peak_gib is not None else ""
            print(f"step {step}/{self.total}  loss {loss:.4f}  {tokens_per_s:,.0f} tok/s{extra_text}  lr {lr:.2e}  "
                  f"ETA {eta:,.0f}s", file=sys.stderr, flush=True)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
