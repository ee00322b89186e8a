"""``damo_jax.train.log``: a resumed run's metrics.jsonl and TensorBoard events show each step once."""
from __future__ import annotations

import json

import pytest

from damo_jax.train.log import TrainLog, drop_records_after, read_metrics


def test_resume_drops_the_records_of_the_steps_it_redoes(tmp_path):
    log = TrainLog(tmp_path, total_steps=6, progress=False)
    for step in range(1, 6):
        log.write_train(step, 0, {"total_loss": float(step)})
    log.write_eval(4, 0, {"AP": 0.5})
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write("not json\n")                          # a foreign line is kept, never a crash
    resumed = TrainLog(tmp_path, total_steps=6, start_step=3, progress=False)   # checkpoint 3
    for step in (4, 5, 6):
        resumed.write_train(step, 0, {"total_loss": 10.0 + step})
    resumed.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert "not json" in lines
    records = [json.loads(line) for line in lines if line != "not json"]
    assert [(r["kind"], r["step"]) for r in records] == [
        ("train", 1), ("train", 2), ("train", 3), ("train", 4), ("train", 5), ("train", 6)]
    assert [r["total_loss"] for r in records] == [1.0, 2.0, 3.0, 14.0, 15.0, 16.0]
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")["train"]] == [1, 2, 3, 4, 5, 6]


def test_drop_records_after_leaves_a_file_without_later_steps_untouched(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert drop_records_after(path, 3) == 0 and not path.exists()
    path.write_text('{"kind": "train", "step": 1}\n{"kind": "train", "step": 2}\n')
    before = path.stat().st_mtime_ns
    assert drop_records_after(path, 2) == 0 and path.stat().st_mtime_ns == before
    with open(path, "a") as f:
        f.write('{"kind": "train", "st')          # a line cut short by a killed process
    assert drop_records_after(path, 2) == 0 and path.read_text().endswith('"st\n')
    assert drop_records_after(path, 1) == 1
    assert path.read_text() == '{"kind": "train", "step": 1}\n{"kind": "train", "st\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_a_run_that_starts_again_from_step_0_logs_each_step_once(tmp_path, caplog):
    """A run stopped before its first checkpoint starts again from step 0 in the same workdir;
    its old records stayed (the audit: metrics.jsonl with steps 1-8 and evals twice, two
    TensorBoard files over the same steps). Now they are dropped (warned) and TensorBoard's older
    events of the redone steps are purged."""
    import logging
    import time

    first = TrainLog(tmp_path, total_steps=6, progress=False)
    for step in (1, 2, 3):
        first.write_train(step, 0, {"total_loss": float(step)})
    first.close()
    time.sleep(1.1)                          # event file names carry the second they were made
    with caplog.at_level(logging.WARNING):
        again = TrainLog(tmp_path, total_steps=6, progress=False)     # no checkpoint: step 0
    assert "dropped 3 records of an earlier run that wrote no checkpoint" in caplog.text
    for step in (1, 2):
        again.write_train(step, 0, {"total_loss": 10.0 * step})
    again.close()
    records = read_metrics(tmp_path / "metrics.jsonl")["train"]
    assert [(r["step"], r["total_loss"]) for r in records] == [(1, 10.0), (2, 20.0)]
    # TensorBoard hides an earlier file's events from a step on when a later file starts with a
    # SessionLog START at that step (its "purge"): the new file must open with one at step 1
    files = sorted((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 2
    events = _events(files[1])
    start = [e for e in events if e.HasField("session_log")]
    assert start and start[0].step == 1 and start[0].session_log.status == start[0].session_log.START
    assert events.index(start[0]) < min(i for i, e in enumerate(events) if e.HasField("summary"))


def _events(path):
    """The Event protos of a TensorBoard event file (TFRecord framing: length, crc, data, crc)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event
    data, out, i = path.read_bytes(), [], 0
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i:i + 8])
        out.append(Event.FromString(data[i + 12:i + 12 + n]))
        i += 12 + n + 4
    return out


def test_log_lines_give_elapsed_time_and_eta(tmp_path, capsys, monkeypatch):
    """Without a progress bar (a log file, a scheduler) nothing said how long the run had left;
    the jsonl records had no wall-clock time either."""
    import json

    from damo_jax.train import log as log_lib
    clock = iter([100.0, 100.0, 100.0, 130.0, 130.0, 130.0, 130.0])
    monkeypatch.setattr(log_lib.time, "perf_counter", lambda: next(clock))
    tl = log_lib.TrainLog(tmp_path, total_steps=100, start_step=10, progress=False)
    metrics = {"total_loss": 1.0, "lr": 1e-3}
    tl.step(11, metrics, images=8)            # the first step after compiling: the origin
    tl.step(21, metrics, images=8)            # 10 steps in 30 s
    tl.write_train(21, 0, metrics)
    tl.close()
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.endswith("elapsed 0:30, ETA 3:57"), line        # 79 steps left at 3 s each
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert abs(record["time"] - __import__("time").time()) < 60


def test_the_train_cli_shows_a_bar_only_on_a_terminal():
    import io

    from damo_jax.cli.train import _is_terminal

    class Tty(io.StringIO):
        def isatty(self):
            return True
    assert _is_terminal(Tty()) and not _is_terminal(io.StringIO())


def test_a_failed_log_write_is_one_user_error_naming_the_file(tmp_path):
    """Disk full / no permission on metrics.jsonl was a traceback (the audit: four of them, exit 1)
    while a failed checkpoint write was one line: now the same one-line error, naming the file."""
    from damo_jax.errors import UserError
    log = TrainLog(tmp_path, total_steps=4, progress=False)
    log.write_train(1, 0, {"total_loss": 1.0})
    (tmp_path / "metrics.jsonl").unlink()
    (tmp_path / "metrics.jsonl").mkdir()          # open(..., "a") now fails with an OSError
    with pytest.raises(UserError,
                       match=r"cannot write .*metrics.jsonl: .*; no checkpoint was written yet"):
        log.write_eval(2, 0, {"AP": 0.5})
    log.close()
