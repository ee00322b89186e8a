"""What a training run shows and leaves behind: tqdm line, TensorBoard, metrics.jsonl, curves.png.

``TrainLog(workdir, total_steps=..., start_step=...)``:

* ``step(step, metrics, images)`` — advances the tqdm bar; every call updates the postfix (loss
  components, lr, images/s); ``write_train`` appends one ``metrics.jsonl`` line and TensorBoard
  scalars ``train/<name>``.
* ``write_eval(step, epoch, metrics)`` — ``eval/<name>`` scalars + a jsonl line with ``"kind": "eval"``.
  The jsonl records count epochs from 1, as the console lines (the methods take them 0-based).
* ``write_eval_failure(step, epoch, error)`` — a ``"kind": "eval_failed"`` jsonl line.
* ``info(msg)`` — a line printed above the bar (and to the python logger).
* ``plot_curves(jsonl, png)`` — loss components and AP/AP50 against step, one PNG (matplotlib Agg).

Only the primary process (``jax.process_index() == 0``) writes files; the others are silent.
A resumed run (``start_step`` > 0) first drops the records of steps after ``start_step`` from the
jsonl (steps the resumed run does again, exactly: the same values) and purges them from TensorBoard
(``purge_step``), so neither shows a step twice; :func:`read_metrics` still keeps the LAST record of
each (kind, step) for files written before.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)


TRAIN_KEYS = ("total_loss", "loss_cls", "loss_bbox", "loss_dfl", "loss_distill")
BAR_KEYS = (("loss", "total_loss"), ("cls", "loss_cls"), ("box", "loss_bbox"), ("dfl", "loss_dfl"),
            ("kd", "loss_distill"), ("w_kd", "distill_weight"))   # kd*: only when distilling


class TrainLog:
    def __init__(self, workdir, *, total_steps: int, start_step: int = 0, primary: bool = True,
                 progress: bool = True):
        self.workdir = Path(workdir)
        self.primary = primary
        self.total_steps = int(total_steps)
        self.jsonl_path = self.workdir / "metrics.jsonl"
        self._tb = None
        self._bar = None
        self._last_time = time.perf_counter()
        self._images_since = 0
        self.images_per_sec = float("nan")
        self._origin = None                 # (time, step) of the first step after compiling: ETA
        if not primary:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        # the records of steps after the start are from a run that stopped before its next
        # checkpoint (or before its first: start_step 0): they are redone, each step logged once
        dropped = drop_records_after(self.jsonl_path, int(start_step))
        if dropped and start_step == 0:
            log.warning("%s: dropped %d records of an earlier run that wrote no checkpoint (this run "
                        "starts from step 0 again)", self.jsonl_path, dropped)
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(logdir=str(self.workdir / "tensorboard"),
                                 purge_step=int(start_step) + 1)   # older event files' later steps hidden
        if progress:
            from tqdm import tqdm
            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                             dynamic_ncols=True, file=sys.stderr, mininterval=1.0)

    # ---- per step
    def step(self, step: int, metrics: dict, images: int) -> None:
        """Account one finished step (``step`` = number of completed steps after it)."""
        self._images_since += images
        now = time.perf_counter()
        if self._origin is None:
            self._origin = (now, int(step))
        if now - self._last_time >= 2.0:
            self.images_per_sec = self._images_since / (now - self._last_time)
            self._last_time, self._images_since = now, 0
        if self._bar is not None:
            post = {short: f"{float(metrics[key]):.3f}" for short, key in BAR_KEYS if key in metrics}
            post["lr"] = f"{float(metrics.get('lr', 0.0)):.2e}"
            post["img/s"] = (f"{self.images_per_sec:.1f}" if math.isfinite(self.images_per_sec)
                             else "-")             # measured over >= 2 s windows
            self._bar.set_postfix(post, refresh=False)
            self._bar.update(1)

    def eta(self, step: int) -> str:
        """``"elapsed 12:03, ETA 1:02:10"`` from the average pace since the first step after
        compiling (evaluations and checkpoints included); ``""`` before there is one."""
        if self._origin is None or step <= self._origin[1]:
            return ""
        t0, s0 = self._origin
        elapsed = time.perf_counter() - t0
        left = elapsed / (step - s0) * max(0, self.total_steps - step)
        return f"elapsed {_clock(elapsed)}, ETA {_clock(left)}"

    def reset_timer(self) -> None:
        """Restart the images/s window (after compilation, evaluation or a checkpoint)."""
        self._last_time, self._images_since = time.perf_counter(), 0

    def write_train(self, step: int, epoch: int, metrics: dict) -> None:
        """One ``metrics.jsonl`` record and TensorBoard scalars; without a progress bar
        (``--no-progress``: logs, schedulers) also one console line with the losses, as the bar's
        postfix would show them. ``epoch`` is 0-based here; the jsonl record and the console count
        epochs from 1 (the checkpoint's ``epoch`` after that epoch's last step is the same number)."""
        record = {k: float(v) for k, v in metrics.items()}
        if math.isfinite(self.images_per_sec):
            record["images_per_sec"] = self.images_per_sec
        self._append({"kind": "train", "step": int(step), "epoch": int(epoch) + 1, **record})
        if self._bar is None and self.primary:
            parts = [f"{short} {record[key]:.4f}" for short, key in BAR_KEYS if key in record]
            parts.append(f"lr {record.get('lr', 0.0):.2e}")
            if "images_per_sec" in record:
                parts.append(f"{record['images_per_sec']:.1f} img/s")
            eta = self.eta(step)
            if eta:
                parts.append(eta)
            self.info(f"step {int(step)}/{self.total_steps} (epoch {int(epoch) + 1}): "
                      + ", ".join(parts))
        if self._tb is not None:
            for k, v in record.items():
                self._tb.add_scalar(f"train/{k}", v, int(step))

    def write_eval(self, step: int, epoch: int, metrics: dict) -> None:
        """``eval/<name>`` scalars and a jsonl record; ``epoch`` 0-based here, from 1 in the record."""
        record = {k: float(v) for k, v in metrics.items()}
        self._append({"kind": "eval", "step": int(step), "epoch": int(epoch) + 1, **record})
        if self._tb is not None:
            with self._writing(self.workdir / "tensorboard"):
                for k, v in record.items():
                    self._tb.add_scalar(f"eval/{k}", v, int(step))
                self._tb.flush()

    def write_eval_failure(self, step: int, epoch: int, error: str) -> None:
        """A jsonl record ``{"kind": "eval_failed", "step", "epoch" (from 1), "error"}`` for an
        evaluation that failed (the console line says so too; ``"eval"`` records stay metrics)."""
        self._append({"kind": "eval_failed", "step": int(step), "epoch": int(epoch) + 1,
                      "error": str(error)})

    def info(self, msg: str) -> None:
        """Print a line (primary process only) above the progress bar."""
        if not self.primary:
            return
        if self._bar is not None:
            self._bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def _append(self, record: dict) -> None:
        if not self.primary:
            return
        record = dict(record, time=round(time.time(), 1))     # wall clock (unix s): the pace
        with self._writing(self.jsonl_path):
            with open(self.jsonl_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    @contextlib.contextmanager
    def _writing(self, path):
        """A failed write of the run's logs (disk full, no permission) as one
        :class:`~damo_jax.train.checkpoint.CheckpointWriteError` line naming the file and the
        reason (it was a traceback), as a failed checkpoint write is."""
        from damo_jax.train.checkpoint import (CKPT_SUBDIR, CheckpointWriteError, _write_reason,
                                               resume_hint)
        try:
            yield
        except OSError as err:
            raise CheckpointWriteError(
                f"cannot write {path}: {_write_reason(err)}; "
                f"{resume_hint(self.workdir / CKPT_SUBDIR)} (free disk space or fix the folder's "
                f"permissions)") from err


def _clock(seconds: float) -> str:
    """``"4:05"`` / ``"1:02:10"``."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return (f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}")


# --------------------------------------------------------------------------------------------------
def drop_records_after(jsonl_path, step: int) -> int:
    """Rewrite a ``metrics.jsonl`` without its records of steps > ``step`` (atomic: temporary file,
    then rename); lines that are not such records are kept, and a last line cut short by a killed
    process gets its newline (the next record must not run into it). Returns the number dropped."""
    import os
    path = Path(jsonl_path)
    if not path.is_file():
        return 0
    text = path.read_text(encoding="utf-8", errors="replace")
    kept, dropped = [], 0
    for line in text.splitlines(keepends=True):
        try:
            later = int(json.loads(line)["step"]) > step
        except (ValueError, KeyError, TypeError):
            later = False
        if later:
            dropped += 1
        else:
            kept.append(line if line.endswith("\n") else line + "\n")
    if dropped or (text and not text.endswith("\n")):
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)
    return dropped


def read_metrics(jsonl_path) -> dict[str, list[dict]]:
    """Records of a ``metrics.jsonl`` by kind, sorted by step, last record per (kind, step) wins.
    Lines that are not records (a line cut short by a killed process, a foreign line) are
    skipped."""
    latest: dict[tuple[str, int], dict] = {}
    path = Path(jsonl_path)
    if path.exists():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                r = json.loads(line)
                latest[(r.get("kind", "train"), int(r["step"]))] = r
            except (ValueError, KeyError, TypeError, AttributeError):
                continue
    out: dict[str, list[dict]] = {"train": [], "eval": []}
    for (kind, _), r in sorted(latest.items(), key=lambda kv: kv[0][1]):
        out.setdefault(kind, []).append(r)
    return out


def plot_curves(jsonl_path, png_path) -> Path:
    """Loss components (left) and AP / AP50 (right) against the step; returns the PNG path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = read_metrics(jsonl_path)
    fig, (ax_l, ax_r) = plt.subplots(1, 2, figsize=(11, 4))
    train = data["train"]
    for key in TRAIN_KEYS:
        pts = [(r["step"], r[key]) for r in train if key in r]
        if pts:
            ax_l.plot(*zip(*pts), label=key)
    ax_l.set_xlabel("step"), ax_l.set_ylabel("loss"), ax_l.set_title("training loss")
    ax_l.grid(alpha=0.3)
    if train:
        ax_l.legend()
    for key, style in (("AP50", "o-"), ("AP", "s-")):
        pts = [(r["step"], r[key]) for r in data["eval"] if key in r]
        if pts:
            ax_r.plot(*zip(*pts), style, label=f"val {key}")
    ax_r.set_xlabel("step"), ax_r.set_ylabel("mAP"), ax_r.set_title("validation (EMA weights)")
    ax_r.set_ylim(0, 1), ax_r.grid(alpha=0.3)
    if data["eval"]:
        ax_r.legend()
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path


def write_predictions_png(model, variables, dataset, cfg, png_path, *, num_images: int = 8,
                          score_thr: float = 0.3) -> Path:
    """A grid of the first images (≤ ``num_images``) of ``dataset`` with the model's detections.

    The inference path of evaluation (:func:`damo_jax.inference.pipeline.detect`, ``cfg.test``
    thresholds and batch size, so the compiled eval step is reused), drawn on the resized images
    with :mod:`damo_jax.inference.draw` (score ≥ ``score_thr``).
    """
    import jax
    import numpy as np

    from damo_jax.data_pipelines import eval_batches
    from damo_jax.inference.draw import draw_detections, image_grid
    from damo_jax.inference.pipeline import JaxBackend, detect, nms_params

    hw = tuple(int(v) for v in cfg.test.image_size)
    batch = next(iter(eval_batches(dataset, hw, int(cfg.test.batch_size))))
    out = jax.device_get(detect(JaxBackend(model, variables), batch["images"], nms_params(cfg.test)))
    tiles = []
    for i in np.flatnonzero(batch["valid"])[:num_images]:     # unreadable images are invalid rows
        n = int(out["num_dets"][i])
        tiles.append(draw_detections(batch["images"][i], out["boxes"][i, :n], out["scores"][i, :n],
                                     out["labels"][i, :n], tuple(dataset.class_names), score_thr=score_thr))
    png_path = Path(png_path)
    image_grid(tiles, cols=4).save(png_path)
    return png_path
