"""``damo_jax.train.log``: a resumed run's metrics.jsonl and TensorBoard events show each step once."""
from __future__ import annotations

import json

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
