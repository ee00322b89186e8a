"""Checkpoint recovery never loses work: a resume that cannot use a checkpoint leaves it in place
(F1), a garbled metrics file is no traceback (F3), re-writing a step's metrics never deletes the
step first (F2)."""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
import pytest

from damo_jax.errors import UserError
from damo_jax.train import checkpoint
from test_checkpoint import _assert_tree_equal, _meta, _state


def _save(d, steps, state=None, metrics=None, keep=5):
    state = state or _state(big=True)
    with checkpoint.Checkpoints(d, keep=keep) as ck:
        for step in steps:
            m = (metrics or {}).get(step)
            meta = dict(_meta(step), eval=m or {})
            ck.save(step, dict(state, step=jnp.asarray(step, jnp.int32)), meta, metrics=m)
    return state


def _names(d):
    return sorted(p.name for p in Path(d).iterdir())


def _truncate_arrays(step_dir):
    for data in (step_dir / "state" / "ocdbt.process_0" / "d").iterdir():
        with open(data, "r+b") as f:
            f.truncate(data.stat().st_size // 2)


# ------------------------------------------------------------------------------------------ F1
def _clipped_template(seed=9):
    """``_state`` with another optimizer chain (a gradient clip in front, as
    ``--config.train.grad_clip=10`` where the run had 0): same array shapes, other tree."""
    state = _state(seed=seed, big=True)
    tx = optax.chain(optax.clip_by_global_norm(10.0), optax.add_decayed_weights(5e-4),
                     optax.sgd(0.1, 0.9, nesterov=True))
    return dict(state, opt_state=tx.init(state["params"]))


def test_a_structure_change_leaves_every_checkpoint_in_place(tmp_path, caplog):
    """grad_clip 0 -> 10 changes the opt_state tree, not its array shapes: every healthy step was
    counted as "files cannot be read" and renamed to ``<step>.unusable``; the original command then
    started from step 0. Now nothing is renamed, the caller gets None (it names what changed) and
    the original template still resumes from the newest step."""
    d = tmp_path / "ck"
    _save(d, (1, 2))
    template = _clipped_template()
    assert sorted(jax.tree.leaves(jax.tree.map(jnp.shape, template["opt_state"]))) == \
        sorted(jax.tree.leaves(jax.tree.map(jnp.shape, _state(big=True)["opt_state"])))
    with caplog.at_level(logging.WARNING), checkpoint.Checkpoints(d, keep=5) as ck:
        assert not ck._fits(template, 2) and ck._fits(_state(seed=9, big=True), 2)
        assert ck.restore_latest(template) is None
        assert ck.steps() == [1, 2]
    assert _names(d) == ["1", "2"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert sum("does not load into this model/config" in w for w in warnings) == 2, warnings
    assert not any("moved aside" in w for w in warnings), warnings
    with checkpoint.Checkpoints(d, keep=5) as ck:
        restored, meta = ck.restore_latest(_state(seed=9, big=True))
    assert meta["step"] == 2 and int(restored["step"]) == 2


def test_a_transient_restore_error_renames_nothing(tmp_path):
    """Out of memory (or an I/O / permission error) while restoring renamed EVERY healthy step to
    ``<step>.unusable``. Now: one CheckpointReadError (a UserError: ``error:`` line, exit 2), no
    fallback to an older step, nothing renamed."""
    d = tmp_path / "ck"
    _save(d, (1, 2))
    with checkpoint.Checkpoints(d, keep=5) as ck:
        real = ck._mngr.restore

        def flaky(*args, **kwargs):
            raise MemoryError("simulated: RESOURCE_EXHAUSTED while allocating restore buffers")
        ck._mngr.restore = flaky
        with pytest.raises(checkpoint.CheckpointReadError, match=r"ck/2 \(MemoryError: simulated") as e:
            ck.restore_latest(_state(seed=9, big=True))
        assert isinstance(e.value, UserError) and "no checkpoint was changed" in str(e.value)
        ck._mngr.restore = real
        assert ck.steps() == [1, 2]
    assert _names(d) == ["1", "2"]


def test_when_no_step_restores_no_step_is_renamed(tmp_path):
    """Every step has bad files: they were renamed one by one, and the rerun started from 0. Now
    they stay, and the error (one line, a UserError) names each step and why."""
    d = tmp_path / "ck"
    _save(d, (1, 2))
    _truncate_arrays(d / "1")
    shutil.rmtree(d / "2" / "ema")
    with checkpoint.Checkpoints(d, keep=5) as ck:
        with pytest.raises(checkpoint.CheckpointCorruptError,
                           match=r"no checkpoint in .*ck can be restored: step 2: incomplete: missing "
                                 r"ema; step 1: its files cannot be read: ") as e:
            ck.restore_latest(_state(seed=9, big=True))
        assert "\n" not in str(e.value)
    assert _names(d) == ["1", "2"]


def test_a_broken_newest_step_is_set_aside_only_once_an_older_one_restores(tmp_path, caplog):
    d = tmp_path / "ck"
    state = _save(d, (1, 2, 3))
    _truncate_arrays(d / "3")
    with caplog.at_level(logging.WARNING), checkpoint.Checkpoints(d, keep=5) as ck:
        restored, meta = ck.restore_latest(_state(seed=9, big=True))
        assert meta["step"] == 2
        _assert_tree_equal(restored["params"], state["params"])
    assert _names(d) == ["1", "2", "3.unusable"]
    assert any("ck/3 cannot be used (its files cannot be read: " in r.getMessage()
               and "moved aside to 3.unusable (the run resumes from checkpoint 2)" in r.getMessage()
               for r in caplog.records), caplog.text


# ------------------------------------------------------------------------------------------ F3
@pytest.mark.parametrize("garbage", ["garbage{", "", "\xff\xfe", "[1, 2]"])
def test_a_garbled_metrics_file_is_recovered_from_meta(tmp_path, caplog, garbage):
    """An empty / garbled ``<step>/metrics/metrics`` of ANY kept step (not only the newest): Orbax
    reads them all when the manager is created, and every command on the run (train resume, eval,
    predict, export) died with a JSONDecodeError traceback. The evaluation is also in the step's
    ``meta`` (``eval``): read-only users take it from there (best-by-AP still right, nothing
    written), a training run also rewrites the file (atomically); one warning names the file."""
    d = tmp_path / "run" / "checkpoints"
    aps = {1: {"AP": 0.5, "AP50": 0.7}, 2: {"AP": 0.2}, 3: {"AP": 0.3}}
    _save(d, (1, 2, 3), metrics=aps)
    bad = d / "1" / "metrics" / "metrics"
    bad.write_bytes(garbage.encode("latin-1"))
    with caplog.at_level(logging.WARNING):
        assert checkpoint.resolve(tmp_path / "run") == (d, 1)                     # best by AP
        _, variables, _ = checkpoint.load_for_inference(tmp_path / "run")
        assert checkpoint.load_meta(tmp_path / "run", "latest")["step"] == 3
    assert bad.read_bytes() == garbage.encode("latin-1")                       # read-only: untouched
    assert any(f"its metrics file {bad} cannot be read" in r.getMessage()
               and "using the evaluation recorded in its meta" in r.getMessage()
               for r in caplog.records), caplog.text
    with checkpoint.Checkpoints(d, keep=5) as ck:                               # a training run
        assert ck.metrics(1) == aps[1] and ck.best_step() == 1
        restored, meta = ck.restore_latest(_state(seed=9, big=True))
        assert meta["step"] == 3
    assert json.loads(bad.read_text()) == aps[1]                                # repaired
    assert _names(d) == ["1", "2", "3"]


def test_a_garbled_metrics_file_without_a_meta_copy_is_missing_metrics(tmp_path, caplog):
    d = tmp_path / "ck"
    _save(d, (1, 2), metrics={1: {"AP": 0.5}, 2: {"AP": 0.1}})
    (d / "1" / "metrics" / "metrics").write_text("")
    meta = json.loads((d / "1" / "meta" / "metadata").read_text())
    (d / "1" / "meta" / "metadata").write_text(json.dumps(dict(meta, eval={})))
    with caplog.at_level(logging.WARNING), checkpoint.Checkpoints(d, keep=5) as ck:
        assert ck.metrics(1) is None and ck.best_step() == 2
        assert ck.steps() == [1, 2]
    assert any("its evaluation is unknown" in r.getMessage() for r in caplog.records), caplog.text


# ------------------------------------------------------------------------------------------ F2
_REPLACE_SCRIPT = """
import os, sys
import jax.numpy as jnp
from test_checkpoint import _state, _meta
from damo_jax.train import checkpoint
d = sys.argv[1]
ck = checkpoint.Checkpoints(d, keep=5)
state = _state(big=True)
os.environ[checkpoint.EXIT_DURING_SAVE_ENV] = "2"     # as in a rerun: dies if step 2 is re-saved
ck.replace(2, dict(state, step=jnp.asarray(2, jnp.int32)), dict(_meta(2), eval={"AP": 0.9}),
           metrics={"AP": 0.9})
ck.close()
print("REPLACED")
"""


def _pending_run(d):
    """Steps 1 (AP 0.5) and 2 (saved while its evaluation was interrupted: ``eval_pending``)."""
    state = _state(big=True)
    with checkpoint.Checkpoints(d, keep=5) as ck:
        ck.save(1, dict(state, step=jnp.asarray(1, jnp.int32)), dict(_meta(1), eval={"AP": 0.5}),
                metrics={"AP": 0.5})
        ck.save(2, dict(state, step=jnp.asarray(2, jnp.int32)), dict(_meta(2), eval={}, eval_pending=True))
    return state


def _check_replaced(d, state):
    with checkpoint.Checkpoints(d, keep=5) as ck:
        assert ck.steps() == [1, 2] and ck.metrics(2) == {"AP": 0.9} and ck.best_step() == 2
        restored, meta = ck.restore_latest(_state(seed=9, big=True))
    assert meta["step"] == 2 and meta["eval"] == {"AP": 0.9} and "eval_pending" not in meta
    _assert_tree_equal(restored["params"], state["params"])
    _assert_tree_equal(restored["opt_state"], state["opt_state"])
    assert int(restored["step"]) == 2


def test_replace_never_deletes_the_step_before_the_new_copy_is_written(tmp_path):
    """``replace`` (metrics of an interrupted evaluation, attached on resume) deleted checkpoint N
    and saved it again: a process killed meanwhile (here the repo's os._exit hook, which fires while
    step 2 is being saved) left only ``2.orbax-checkpoint-tmp`` and the next run resumed from 1.
    Now the step is updated in place and survives; its arrays are those saved."""
    d = tmp_path / "ck"
    state = _pending_run(d)
    r = subprocess.run([sys.executable, "-c", _REPLACE_SCRIPT, str(d)], capture_output=True, text=True,
                       timeout=300, cwd=str(Path(__file__).parent))
    assert r.returncode == 0 and "REPLACED" in r.stdout, (r.returncode, r.stdout, r.stderr[-3000:])
    assert _names(d) == ["1", "2"]
    assert "metrics" in json.loads((d / "2" / "_CHECKPOINT_METADATA").read_text())["item_handlers"]
    _check_replaced(d, state)


def test_replace_with_a_failing_write_keeps_the_step(tmp_path, monkeypatch):
    """Disk full while the evaluation is written into step 2: the step stays as it was (its
    meta still says evaluation pending: the next run evaluates again), one CheckpointWriteError."""
    d = tmp_path / "ck"
    state = _pending_run(d)
    ck = checkpoint.Checkpoints(d, keep=5)
    real_fsync = checkpoint.os.fsync

    def full(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(checkpoint.os, "fsync", full)
    monkeypatch.setattr(ck._mngr, "save", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "full")))
    with pytest.raises(checkpoint.CheckpointWriteError, match="No space left on device"):
        ck.replace(2, dict(state, step=jnp.asarray(2, jnp.int32)), dict(_meta(2), eval={"AP": 0.9}),
                   metrics={"AP": 0.9})
    monkeypatch.setattr(checkpoint.os, "fsync", real_fsync)
    ck.close()
    assert _names(d) == ["1", "2"]
    assert not [p for p in (d / "2").rglob("*") if ".tmp" in p.name]
    with checkpoint.Checkpoints(d, keep=5) as ck:
        assert ck.metrics(2) is None
        restored, meta = ck.restore_latest(_state(seed=9, big=True))
        assert meta["step"] == 2 and meta.get("eval_pending")
        ck.replace(2, restored, dict(_meta(2), eval={"AP": 0.9}), metrics={"AP": 0.9})
    _check_replaced(d, state)


def test_best_names_a_newer_checkpoint_whose_evaluation_never_ran(tmp_path, caplog):
    """eval / predict / export took the best evaluated step without a word while the newest one,
    saved before its evaluation was cut off, may be better: they now say so, once."""
    d = tmp_path / "ck"
    _pending_run(d)
    with caplog.at_level(logging.WARNING):
        assert checkpoint.resolve(d) == (d, 1)
        assert checkpoint.resolve(d) == (d, 1)
        assert checkpoint.resolve(d, "latest") == (d, 2)
    hits = [r.getMessage() for r in caplog.records if "was not evaluated" in r.getMessage()]
    assert len(hits) == 1 and f"{d}/2 (the newest)" in hits[0] and "step 1" in hits[0], caplog.text
    assert f"--checkpoint {d}/2" in hits[0]


def test_a_garbled_step_record_is_one_warning_not_an_error(tmp_path, caplog):
    """Orbax reads a step whose ``_CHECKPOINT_METADATA`` is not JSON, after an ERROR line that
    read like a failure: now one warning naming the file (once), and the step resumes."""
    d = tmp_path / "ck"
    state = _save(d, (1, 2))
    (d / "2" / "_CHECKPOINT_METADATA").write_text("garbage{")
    with caplog.at_level(logging.WARNING), checkpoint.Checkpoints(d, keep=5) as ck:
        restored, meta = ck.restore_latest(_state(seed=9, big=True))
        ck.restore_latest(_state(seed=9, big=True))
    assert meta["step"] == 2
    _assert_tree_equal(restored["params"], state["params"])
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    hits = [r.getMessage() for r in caplog.records if "is not valid JSON" in r.getMessage()]
    assert hits == [f"{d}/2/_CHECKPOINT_METADATA is not valid JSON (Orbax's record of the step); "
                    f"the step's own files are read without it"], caplog.text


def _flip_a_byte_of(step_dir, item):
    """Flip one byte in the middle of ``item``'s largest array-data file (a disk's bit rot). Orbax /
    TensorStore read it without complaint: the big kernel comes back with other values
    (measured: OCDBT checks its index and small inlined values, not the array chunks)."""
    files = [f for f in (step_dir / item).glob("ocdbt.process_*/d/*") if f.is_file()]
    data_file = max(files, key=lambda f: f.stat().st_size)
    data = bytearray(data_file.read_bytes())
    data[len(data) // 2] ^= 0x10
    data_file.write_bytes(bytes(data))


@pytest.mark.parametrize("item", ["state", "ema"])
def test_a_flipped_bit_in_an_array_file_is_caught(tmp_path, caplog, item):
    """A damaged value read silently (the audit's bit flip): each item's arrays now carry a CRC-32
    in the meta. A resume falls back to the older step and sets the damaged one aside; eval /
    predict / export loading it stop with one error naming the item."""
    d = tmp_path / "ck"
    state = _save(d, (1, 2))
    _flip_a_byte_of(d / "2", item)
    with caplog.at_level(logging.WARNING), checkpoint.Checkpoints(d, keep=5) as ck:
        restored, meta = ck.restore_latest(_state(seed=9, big=True))
    assert meta["step"] == 1
    _assert_tree_equal(restored["params"], state["params"])
    assert _names(d) == ["1", "2.unusable"]
    assert f"the arrays of item '{item}' do not match the checksum" in caplog.text
    shutil.move(str(d / "2.unusable"), str(d / "2"))
    which = "model" if item == "state" else "ema"
    with pytest.raises(checkpoint.CheckpointCorruptError,
                       match=rf"ck/2: the arrays of item '{item}' do not match the checksum recorded "
                             rf"when they were saved .*files are damaged; complete steps: \[1\]"):
        checkpoint.load_for_inference(d, step=2, which=which)
    config, variables, _ = checkpoint.load_for_inference(d, step=1, which=which)   # the healthy one
    _assert_tree_equal(variables["params"], state["params" if item == "state" else "ema_params"])
