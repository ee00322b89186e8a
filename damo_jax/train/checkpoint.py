"""Orbax checkpoints of a training run (TOOLCHAIN §4 args API, orbax-checkpoint 0.11.36).

Layout: ``<workdir>/checkpoints/<step>/`` with three items

* ``state`` — the training state without EMA: ``params``, ``batch_stats``, ``opt_state``, ``step``,
  ``rng``, and when distilling the align convs ``align_params`` / ``align_opt_state`` (keys:
  ``damo_jax.train.state``; StandardSave; restored onto the shardings of a template state). The
  frozen teacher is NOT saved: it is reloaded from ``config.distill.teacher_weights`` (the meta's
  ``distill.teacher_fingerprint`` guards a resume),
* ``ema``   — ``{"params", "batch_stats"}`` of the EMA model (what evaluation / export use). The raw
  model and the EMA are BOTH saved (the official trainer saved only the EMA and resumed from it),
* ``meta``  — JSON: ``config`` (the full ConfigDict), ``class_names``, ``category_ids``, ``loader``
  (data-loader position: next global step), ``epoch``, ``step``, the last evaluation metrics
  (``eval_pending`` while the step's evaluation has not run) and ``array_crc32``: a CRC-32 of the
  ``state`` and ``ema`` items' arrays, checked on every restore (Orbax reads damaged array chunks
  without complaint).

Atomicity: Orbax writes ``<step>.orbax-checkpoint-tmp`` and renames it when every item is written,
so a finalized step directory is complete; an interrupted save leaves only the tmp folder, which
``CheckpointManager`` never lists (and removes on the next save). ``restore_latest`` additionally
checks every item is present and falls back to the previous step if a checkpoint fails to load.
Retention: the last ``keep`` checkpoints plus the best one by validation ``AP`` (Orbax
``LatestN`` ∪ ``BestN``).
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shlex
import signal
import sys
import threading
from pathlib import Path

import jax
import ml_collections
import orbax.checkpoint as ocp

from damo_jax.errors import ConfigError, InputPathError, UserError, debug_enabled
from damo_jax.train import state as state_lib

log = logging.getLogger(__name__)


class _ReadOnlyNotices(logging.Filter):
    """Drops Orbax's two warnings for a manager opened ``read_only`` on purpose (loading a run for
    eval / predict / export): they say what was asked for and read like a problem."""
    NOTICES = ("CheckpointManagerOptions.read_only=True", "Given directory is read only")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in str(record.msg) for text in self.NOTICES)


logging.getLogger("absl").addFilter(_ReadOnlyNotices())


class _OrbaxErrorsShort(logging.Filter):
    """Orbax's background save threads log each failure (disk full, no permission) at ERROR with a
    full traceback, five times per failed save (~470 lines); the run then stops with one
    ``error:`` line (:class:`CheckpointWriteError`). Keeps each ERROR record of the ``absl``
    logger (Orbax's), on one line, without its traceback (all of it with ``DAMO_JAX_DEBUG=1`` /
    ``--debug``)."""

    GARBLED = re.compile(r"Failed to json parse Metadata file: (.+?), file content:")
    _seen: set = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and not debug_enabled(sys.argv):
            message = " ".join(record.getMessage().split())
            garbled = self.GARBLED.match(message)
            if garbled:          # Orbax reads the step without it: a warning, once per file
                if garbled.group(1) in self._seen:
                    return False
                self._seen.add(garbled.group(1))
                record.levelno, record.levelname = logging.WARNING, "WARNING"
                record.msg, record.args = ("%s is not valid JSON (Orbax's record of the step); the "
                                           "step's own files are read without it"), (garbled.group(1),)
                record.exc_info, record.exc_text, record.stack_info = None, None, None
                return True
            record.msg, record.args = message[:300] + ("..." if len(message) > 300 else ""), ()
            record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


logging.getLogger("absl").addFilter(_OrbaxErrorsShort())


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (disk full, no permission, ...): one line naming the
    folder, the reason and the checkpoint the same command resumes from."""


def resume_hint(directory) -> str:
    """What the same command does after a failed write: resume from the newest complete
    checkpoint in ``directory``, or start again when there is none."""
    done = complete_steps(directory)
    return (f"the same command resumes from checkpoint {done[-1]} once that is fixed" if done
            else "no checkpoint was written yet")


def _write_reason(err: BaseException) -> str:
    """The OS reason of a failed write (``No space left on device (errno 28)``), else the root
    cause."""
    text = " ".join(str(err).split())
    cause = err
    while cause.__cause__ is not None:
        cause = cause.__cause__
        text += " " + " ".join(str(cause).split())
    found = re.search(r"([A-Za-z][^:\[\]]*?) \[os_error_code='(\d+)'\]", text)
    if found:
        return f"{found.group(1)} (errno {found.group(2)})"
    if isinstance(cause, OSError) and cause.strerror:
        return f"{cause.strerror} (errno {cause.errno}){': ' + str(cause.filename) if cause.filename else ''}"
    return root_cause(err)


class _ShutdownNoise(logging.Filter):
    """Drops asyncio's "unhandled exception during asyncio.run() shutdown" records: a checkpoint
    whose array files are truncated makes tensorstore fail every pending read, and each failure
    was logged with its traceback (~190 000 lines for one S checkpoint) before the one error that
    matters (which :func:`root_cause` names)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "unhandled exception during asyncio.run() shutdown" not in str(record.msg)


@contextlib.contextmanager
def _quiet_shutdown_noise():
    noise = _ShutdownNoise()
    logger = logging.getLogger("asyncio")
    logger.addFilter(noise)
    try:
        yield
    finally:
        logger.removeFilter(noise)


def root_cause(err: BaseException, limit: int = 240) -> str:
    """``"Type: message"`` of the innermost cause of a restore error (the tensorstore / file error,
    not Orbax's wrappers), on one line of at most ``limit`` characters."""
    cause = err
    while cause.__cause__ is not None:
        cause = cause.__cause__
    reason = " ".join(str(cause.args[0] if isinstance(cause, KeyError) and cause.args
                          else cause).split()) or type(cause).__name__
    reason = reason if len(reason) <= limit else reason[:limit - 3] + "..."
    return f"{type(cause).__name__}: {reason}"

def _key_name(entry) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _layout(tree) -> list[tuple[tuple[str, ...], tuple[int, ...]]]:
    """Sorted ``(key path, shape)`` of every array of ``tree``, the path's entries as strings
    (``opt_state/1/0/trace/...`` alike for an optax namedtuple and Orbax's metadata dict)."""
    return sorted((tuple(_key_name(e) for e in path), tuple(getattr(leaf, "shape", ()) or ()))
                  for path, leaf in jax.tree_util.tree_leaves_with_path(tree))


class CheckpointReadError(UserError):
    """Restoring a checkpoint failed for a reason that is not its files (out of memory, permission
    denied, an I/O error): nothing was moved or deleted; the same command is rerun once fixed."""


_TRANSIENT_ERRNOS = {errno.ENOMEM, errno.EIO, errno.EACCES, errno.EPERM, errno.EAGAIN,
                     errno.ETIMEDOUT, errno.ESTALE, errno.ENOSPC, errno.EMFILE, errno.ENFILE}
_TRANSIENT_TEXTS = ("RESOURCE_EXHAUSTED", "PERMISSION_DENIED", "Out of memory", "out of memory",
                    "Cannot allocate memory", "Permission denied", "Input/output error",
                    "Stale file handle", "DEADLINE_EXCEEDED", "UNAVAILABLE")


def _transient(err: BaseException) -> bool:
    """Whether a restore failure comes from the machine (memory, permissions, I/O), not from the
    checkpoint's files: a reason to stop, never to set a checkpoint aside."""
    seen, stack = set(), [err]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, MemoryError):
            return True
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
            return True
        if any(text in str(e) for text in _TRANSIENT_TEXTS):
            return True
        stack += [e.__cause__, e.__context__]
    return False


STATE_KEYS = state_lib.CHECKPOINT_KEYS
ITEMS = ("state", "ema", "meta")
BEST_METRIC = "AP"
CKPT_SUBDIR = "checkpoints"
# Test hook: exit the process (``os._exit``) right after the save of this step was started,
# i.e. while Orbax is still writing it (used by tests/test_train_resume.py).
EXIT_DURING_SAVE_ENV = "DAMO_JAX_TEST_EXIT_DURING_SAVE"


# --------------------------------------------------------------------------------------------------
# Config <-> JSON
# --------------------------------------------------------------------------------------------------
def config_to_json(cfg: ml_collections.ConfigDict) -> dict:
    """Plain-JSON dict of a config (tuples become lists)."""
    return json.loads(cfg.to_json_best_effort())


def _tuples(x):
    if isinstance(x, dict):
        return {k: _tuples(v) for k, v in x.items()}
    if isinstance(x, list):
        return tuple(_tuples(v) for v in x)
    return x


def config_from_json(d: dict) -> ml_collections.ConfigDict:
    """Inverse of ``config_to_json`` (lists back to tuples, as the config files write them)."""
    return ml_collections.ConfigDict(_tuples(d))


# --------------------------------------------------------------------------------------------------
# State <-> checkpoint items
# --------------------------------------------------------------------------------------------------
def split_state(state: dict) -> tuple[dict, dict]:
    """(``state`` item, ``ema`` item) of a train state dict (the teacher goes into neither)."""
    state_lib.check_state(state, "checkpoint.split_state")
    return ({k: state[k] for k in state_lib.checkpoint_keys(state)},
            {"params": state["ema_params"], "batch_stats": state["ema_batch_stats"]})


def join_state(train_item: dict, ema_item: dict, template: dict | None = None) -> dict:
    """Inverse of ``split_state``; the frozen teacher is taken from ``template`` (if it has one)."""
    teacher = {k: template[k] for k in state_lib.TEACHER_KEYS if template and k in template}
    return {**train_item, "ema_params": ema_item["params"], "ema_batch_stats": ema_item["batch_stats"],
            **teacher}


DIGEST_KEY = "array_crc32"     # meta: {"state": int, "ema": int}, CRC-32 of each item's arrays


def item_digest(tree) -> int | None:
    """CRC-32 over the bytes of every array of ``tree`` (leaves in the order of their key paths
    written as in :func:`_layout`, so an optax namedtuple and the dict Orbax restores without a
    template agree; each one's path, dtype and shape mixed in), computed on this process's copy;
    None when some array is not
    fully replicated (its bytes are spread over processes: not checked). Saved in the meta so a
    restore notices damaged array files (a flipped bit) that Orbax and TensorStore read without
    complaint."""
    import zlib

    import numpy as np
    crc = 0
    leaves = sorted((("/".join(_key_name(e) for e in path), x)
                     for path, x in jax.tree_util.tree_leaves_with_path(tree)), key=lambda t: t[0])
    for path, x in leaves:
        if isinstance(x, jax.Array):
            if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
                x = jax.random.key_data(x)
            if not x.is_fully_replicated:
                return None
            x = x.addressable_shards[0].data
        a = np.ascontiguousarray(np.asarray(x))
        crc = zlib.crc32(f"{path}:{a.dtype.str}:{a.shape};".encode(), crc)
        crc = zlib.crc32(a.view(np.uint8).reshape(-1) if a.size else b"", crc)
    return crc


def check_digest(items: dict, meta: dict, where: str) -> None:
    """Raise :class:`CheckpointCorruptError` naming the item whose arrays do not match the
    CRC-32 recorded in ``meta`` when they were saved (checkpoints without one pass)."""
    recorded = meta.get(DIGEST_KEY) if isinstance(meta, dict) else None
    if not isinstance(recorded, dict):
        return
    for name, tree in items.items():
        want = recorded.get(name)
        if isinstance(want, int):
            got = item_digest(tree)
            if got is not None and got != want:
                raise CheckpointCorruptError(
                    f"{where}: the arrays of item {name!r} do not match the checksum recorded when "
                    f"they were saved (CRC-32 {got:#010x}, saved {want:#010x}): the files are damaged")


def _abstract(tree):
    """ShapeDtypeStructs carrying each leaf's sharding (restore lands directly on the devices)."""
    def one(x):
        sharding = getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    return jax.tree.map(one, tree)


def _handlers():
    return {"state": ocp.StandardCheckpointHandler(), "ema": ocp.StandardCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler()}


def _best_metric(metrics) -> float:
    return float(metrics[BEST_METRIC])


# --------------------------------------------------------------------------------------------------
# Manager
# --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def deferred_interrupts(signums=(signal.SIGINT, signal.SIGTERM)):
    """Hold Ctrl-C / SIGTERM until the block ends (a checkpoint being written or finalised): the
    interrupt then goes to the handler that was installed (KeyboardInterrupt, the train CLI's
    ``Interrupted``), after the checkpoint is complete, instead of tearing through Orbax's finalise
    thread (an ERROR line and a traceback). A second identical signal during the block is not held.
    Outside the main thread nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {signum: signal.getsignal(signum) for signum in signums}

    def hold(signum, frame):
        if signum in pending:                          # pressed twice: do not wait any longer
            _deliver(signum, previous[signum], frame)
        pending.append(signum)

    for signum in signums:
        signal.signal(signum, hold)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if pending:
            _deliver(pending[0], previous[pending[0]], None)


def _deliver(signum, handler, frame) -> None:
    """Run ``handler`` for ``signum`` as the interpreter would have."""
    if callable(handler):
        handler(signum, frame)
    elif handler == signal.SIG_DFL:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def _interrupted_writes(directory: Path) -> list[int]:
    """Steps whose save was cut off (Orbax's ``<step>.orbax-checkpoint-tmp*`` folders)."""
    if not directory.is_dir():
        return []
    steps = {p.name.split(".", 1)[0] for p in directory.glob("*.orbax-checkpoint-tmp*")}
    return sorted(int(s) for s in steps if s.isdigit())


def _write_json_durably(path: Path, obj) -> None:
    """Write ``obj`` as JSON to ``path`` atomically: a temporary file in the same folder, fsync'd,
    then ``os.replace``, then the folder fsync'd; a crash leaves the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(json.dumps(obj))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _valid_metrics(metrics) -> bool:
    ap = metrics.get(BEST_METRIC) if isinstance(metrics, dict) else None
    return isinstance(metrics, dict) and (ap is None or (isinstance(ap, (int, float))
                                                         and not isinstance(ap, bool)))


class _Manager(ocp.CheckpointManager):
    """Orbax's manager, but a step's ``metrics/metrics`` file that cannot be read (empty or garbled
    after a power loss) is no ``JSONDecodeError`` traceback in every command on the run (Orbax
    reads every step's metrics when the manager is created): the metrics are taken from the step's
    ``meta`` item (it records the same evaluation under ``eval``), else treated as missing; one
    warning per step names the file. ``recovered`` holds what was read from ``meta``."""

    def __init__(self, *args, **kwargs):
        self.recovered: dict[int, dict] = {}
        self._warned: set[int] = set()
        self._warn_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def _get_metrics(self, step: int):
        try:
            metrics = super()._get_metrics(step)
            if metrics is None or _valid_metrics(metrics):
                return metrics
            reason = f"not a dict of numbers: {str(metrics)[:80]}"
        except (ValueError, TypeError, OSError) as err:   # JSONDecodeError, UnicodeDecodeError, EIO
            reason = root_cause(err, limit=120)
        step_dir = Path(str(self._get_read_step_directory(step, self.directory)))
        try:
            saved = json.loads((step_dir / "meta" / "metadata").read_text()).get("eval") or None
        except Exception:  # noqa: BLE001 - an unreadable meta: the step itself is broken
            saved = None
        saved = saved if saved is not None and _valid_metrics(saved) else None
        with self._warn_lock:
            first = step not in self._warned
            self._warned.add(step)
            if saved is not None:
                self.recovered[step] = saved
        if first:
            log.warning("checkpoint %s: its metrics file %s cannot be read (%s); %s", step_dir,
                        step_dir / "metrics" / "metrics", reason,
                        "using the evaluation recorded in its meta" if saved is not None else
                        "its evaluation is unknown (not considered for the best checkpoint)")
        return saved


class Checkpoints:
    """Orbax ``CheckpointManager`` for train states; last ``keep`` + best-by-AP are kept.

    ``save(step, state, meta, metrics=None)`` is asynchronous (``wait()`` blocks);
    ``restore(template, step)`` returns ``(state, meta)`` placed like ``template``.
    """

    def __init__(self, directory, *, keep: int = 3, async_save: bool = True, read_only: bool = False):
        self.directory = Path(directory).absolute()
        self.interrupted_steps = [] if read_only else _interrupted_writes(self.directory)
        if self.interrupted_steps:     # Orbax removes them without a word
            log.warning("checkpoint %s of %s was being written when its run stopped (%s): incomplete, "
                        "removed; the run continues from the newest complete checkpoint, if any",
                        ", ".join(map(str, self.interrupted_steps)), self.directory,
                        ", ".join(f"{s}.orbax-checkpoint-tmp" for s in self.interrupted_steps))
        policies = ocp.checkpoint_managers
        options = ocp.CheckpointManagerOptions(
            create=not read_only, read_only=read_only, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=not read_only, best_fn=_best_metric, best_mode="max",
            preservation_policy=None if read_only else policies.AnyPreservationPolicy([
                policies.LatestN(n=max(int(keep), 1)),
                policies.BestN(get_metric_fn=_best_metric, n=1, keep_checkpoints_without_metrics=False),
            ]))
        self._mngr = _Manager(self.directory, item_handlers=_handlers(), options=options)
        self.broken_newer: list[tuple[int, str, int]] = []     # restore_latest(set_aside=False)
        if not read_only and jax.process_index() == 0:
            for step, metrics in sorted(self._mngr.recovered.items()):   # repair the file on disk
                path = self.directory / str(step) / "metrics" / "metrics"
                try:
                    _write_json_durably(path, metrics)
                    log.warning("checkpoint %s: metrics file rewritten from its meta", path.parent.parent)
                except OSError as err:
                    log.warning("could not rewrite %s (%s)", path, root_cause(err))

    # ---- queries
    def steps(self) -> list[int]:
        return list(self._mngr.all_steps())

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def best_step(self) -> int | None:
        """Step with the highest saved ``AP`` (None when no checkpoint has metrics)."""
        if not any(self._mngr.metrics(s) for s in self.steps()):
            return None
        return self._mngr.best_step()

    def metrics(self, step: int):
        return self._mngr.metrics(step)

    def is_complete(self, step: int) -> bool:
        return _is_complete(self.directory / str(step))

    # ---- save / restore
    def save(self, step: int, state: dict, meta: dict, metrics: dict | None = None) -> None:
        """Start writing ``step`` (asynchronous); a :class:`CheckpointWriteError` when this or the
        previous write failed."""
        train_item, ema_item = split_state(state)
        meta = dict(meta, **{DIGEST_KEY: {"state": item_digest(train_item), "ema": item_digest(ema_item)}})
        with deferred_interrupts(), self._writing():
            self._mngr.save(int(step), args=ocp.args.Composite(
                state=ocp.args.StandardSave(train_item), ema=ocp.args.StandardSave(ema_item),
                meta=ocp.args.JsonSave(meta)), metrics=metrics, force=True)
        if os.environ.get(EXIT_DURING_SAVE_ENV) == str(int(step)):
            print(f"[test hook] exiting while checkpoint {step} is being written", flush=True)
            os._exit(17)

    def replace(self, step: int, state: dict, meta: dict, metrics: dict | None = None) -> None:
        """Give the saved checkpoint ``step`` new ``meta`` and ``metrics`` (an evaluation that was
        interrupted, run on resume). The step's arrays are not written again (``state`` is the
        state restored from that step): its ``metrics/metrics`` file, then its ``meta/metadata``,
        are each replaced atomically and durably (temporary file, fsync, rename), so the step is
        never absent — the old code deleted it, then saved it again, and a kill or a full disk in
        between lost it. A crash between the two files leaves the new metrics with the old meta
        (``eval_pending``): the next run evaluates again. Orbax's manager is then reloaded (best-by-AP
        retention sees the metrics). A step that is not a complete saved checkpoint is saved."""
        step = int(step)
        with deferred_interrupts():
            self.wait()
            folder = self.directory / str(step)
            if step not in self.steps() or not self.is_complete(step):
                self.save(step, state, meta, metrics=metrics)
                return
            try:      # the arrays stay as saved: so does their checksum
                saved = json.loads((folder / "meta" / "metadata").read_text()).get(DIGEST_KEY)
            except (OSError, ValueError, AttributeError):
                saved = None
            meta = dict(meta, **({DIGEST_KEY: saved} if saved else {}))
            if jax.process_index() == 0:
                try:
                    self._rewrite(folder, meta, metrics)
                except OSError as err:
                    raise CheckpointWriteError(
                        f"cannot write the evaluation into checkpoint {folder}: {_write_reason(err)}; "
                        f"the checkpoint is unchanged (free disk space or fix the folder's "
                        f"permissions)") from err
            if jax.process_count() > 1:   # the others read the files only once process 0 wrote them
                from jax.experimental import multihost_utils
                multihost_utils.sync_global_devices(f"damo_jax checkpoint replace {step}")
            self._mngr.reload()

    @staticmethod
    def _rewrite(folder: Path, meta: dict, metrics: dict | None) -> None:
        metrics_file = folder / "metrics" / "metrics"
        if metrics is not None:
            _write_json_durably(metrics_file, metrics)
            record = folder / "_CHECKPOINT_METADATA"       # list the item as Orbax's save does
            try:
                step_md = json.loads(record.read_text())
                handlers = step_md.get("item_handlers")
                if isinstance(handlers, dict) and "metrics" not in handlers and "meta" in handlers:
                    handlers["metrics"] = handlers["meta"]     # JsonCheckpointHandler, as saved
                    _write_json_durably(record, step_md)
            except (ValueError, OSError) as err:
                log.warning("could not list the metrics in %s (%s); they are read all the same",
                            record, root_cause(err))
        _write_json_durably(folder / "meta" / "metadata", meta)
        if metrics is None and metrics_file.exists():
            metrics_file.unlink()

    def restore(self, template: dict, step: int) -> tuple[dict, dict]:
        train_tmpl, ema_tmpl = split_state(template)
        with _quiet_shutdown_noise():
            out = self._mngr.restore(int(step), args=ocp.args.Composite(
                state=ocp.args.StandardRestore(_abstract(train_tmpl)),
                ema=ocp.args.StandardRestore(_abstract(ema_tmpl)), meta=ocp.args.JsonRestore()))
        check_digest({"state": out["state"], "ema": out["ema"]}, out["meta"],
                     f"checkpoint {self.directory}/{int(step)}")
        return join_state(out["state"], out["ema"], template), out["meta"]

    def restore_latest(self, template: dict, *, set_aside: bool = True) -> tuple[dict, dict] | None:
        """Newest complete checkpoint that loads, or None when none fits this model / config.

        Steps are tried newest to oldest WITHOUT touching them. Only once an older step has
        restored are the newer ones whose files are bad (missing items, unreadable files) moved
        aside (``<step>.unusable``, named in a warning): left in place, the resumed run would redo
        their steps and then fail to save those step numbers again. A step that reads but does not
        fit this model / config (other array shapes or tree structure, e.g. another optimizer
        chain) is never moved (the caller names what changed). When no step restores nothing is
        renamed: a :class:`CheckpointCorruptError` if every step has bad files, else None.
        A failure that says nothing about the files (out of memory, permission denied, I/O error)
        stops at once with a :class:`CheckpointReadError`, checkpoints untouched: falling back to
        an older step would silently drop work.

        ``set_aside=False`` leaves the broken newer steps in place and lists them in
        ``self.broken_newer`` for :meth:`set_aside_broken`: a caller that may still refuse the
        restored checkpoint (resume checks) changes the folder only once it goes on."""
        self.broken_newer = []
        bad: list[tuple[int, str]] = []
        steps = sorted(self.steps(), reverse=True)
        for step in steps:
            missing = _missing_items(self.directory / str(step), ITEMS)
            if missing:
                bad.append((step, f"incomplete: missing {', '.join(missing)}"))
                log.warning("checkpoint %s/%s is incomplete (missing %s); trying an older one",
                            self.directory, step, ", ".join(missing))
                continue
            try:
                restored = self.restore(template, step)
            except Exception as err:  # noqa: BLE001 - any read error means "not usable"
                if _transient(err):
                    raise CheckpointReadError(
                        f"cannot read checkpoint {self.directory}/{step} ({root_cause(err)}); no "
                        f"checkpoint was changed: run the same command again once this is fixed"
                        + (f" (steps {sorted(s for s, _ in bad)} did not restore either)" if bad else "")
                    ) from err
                if self._fits(template, step):        # the template fits: the files are bad
                    why = f"its files cannot be read: {root_cause(err)}"
                    bad.append((step, why))
                    log.warning("checkpoint %s/%s cannot be used (%s); trying an older one",
                                self.directory, step, why)
                    continue
                first = (str(err).strip().splitlines() or [type(err).__name__])[0]   # Orbax's are
                log.warning("checkpoint %s/%s does not load into this model/config (%s); trying an "
                            "older one", self.directory, step, first[:200])          # ~40 lines
                continue
            self.broken_newer = [(newer, why, step) for newer, why in bad]
            if set_aside:                             # a step restored: set the broken ones aside
                self.set_aside_broken()
            return restored
        if steps and len(bad) == len(steps):    # every step has bad files
            raise CheckpointCorruptError(
                f"no checkpoint in {self.directory} can be restored: "
                + "; ".join(f"step {s}: {why}" for s, why in bad)
                + "; they were left as they are: move them out of the folder to start over, or "
                  "train in a new --workdir")
        return None

    def _fits(self, template: dict, step: int) -> bool:
        """Whether the arrays recorded for ``step`` (Orbax's metadata) have the template's tree
        structure and shapes (key paths normalised: Orbax's metadata spells optax's namedtuples
        as dicts); a metadata file that cannot be read counts as fitting (the files are bad)."""
        try:
            md = self._mngr.item_metadata(int(step))
            recorded = {name: _layout(dict(md[name])) for name in ("state", "ema")}
        except Exception:  # noqa: BLE001 - unreadable metadata: a broken step, not another model
            return True
        train_tmpl, ema_tmpl = split_state(template)
        return recorded == {"state": _layout(train_tmpl), "ema": _layout(ema_tmpl)}

    def set_aside_broken(self) -> None:
        """Move aside the broken steps newer than the one :meth:`restore_latest` restored."""
        for newer, why, resumed in self.broken_newer:
            self._set_aside(newer, why, resumed=resumed)
        self.broken_newer = []

    def _set_aside(self, step: int, why: str, resumed: int | None = None) -> None:
        """Rename a broken step folder to ``<step>.unusable`` (``.unusable-2``, ... if taken) so
        that neither Orbax nor a later save of the same step trips over it."""
        source = self.directory / str(step)
        target, n = self.directory / f"{step}.unusable", 1
        while target.exists():
            n += 1
            target = self.directory / f"{step}.unusable-{n}"
        if jax.process_index() == 0:       # one folder on a shared file system
            source.rename(target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"damo_jax checkpoint set aside {step}")
        self._mngr.reload()
        log.warning("checkpoint %s cannot be used (%s); moved aside to %s%s", source, why,
                    target.name, f" (the run resumes from checkpoint {resumed})" if resumed is not None
                    else "")

    def restore_items(self, step: int, items=("ema", "meta")) -> dict:
        """Restore some items without a template (arrays on the first local device)."""
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        md = self._mngr.item_metadata(int(step))
        args = {}
        for name in items:
            if name == "meta":
                args[name] = ocp.args.JsonRestore()
            else:
                args[name] = ocp.args.StandardRestore(jax.tree.map(
                    lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), md[name]))
        return dict(self._mngr.restore(int(step), args=ocp.args.Composite(**args)))

    def wait(self) -> None:
        with deferred_interrupts(), self._writing():
            self._mngr.wait_until_finished()

    def close(self) -> None:
        with deferred_interrupts(), self._writing():
            try:
                self._mngr.wait_until_finished()
            finally:
                self._mngr.close()

    @contextlib.contextmanager
    def _writing(self):
        """A failed write (Orbax raises the background thread's error at the next save / wait) as
        one :class:`CheckpointWriteError`."""
        try:
            yield
        except (ocp.checkpoint_manager.StepAlreadyExistsError, CheckpointWriteError):
            raise
        except Exception as err:  # noqa: BLE001 - tensorstore / OS errors of the writer threads
            reason = _write_reason(err)
            if "Barrier timed out" in reason or "DEADLINE_EXCEEDED" in reason:
                # a multi-process save whose processes did not all arrive: not a disk problem
                fix = ("(the processes did not all reach the checkpoint's barrier: one of them "
                       "stalled, or they do not share this folder; every process must write to "
                       "one --workdir on a shared file system)")
            else:
                fix = "(free disk space or fix the folder's permissions)"
            raise CheckpointWriteError(
                f"cannot write checkpoints to {self.directory}: {reason}; "
                + resume_hint(self.directory) + " " + fix) from err

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --------------------------------------------------------------------------------------------------
# The run folder: one writer, complete steps
# --------------------------------------------------------------------------------------------------
LOCK_FILE = ".train.lock"


@contextlib.contextmanager
def workdir_lock(workdir):
    """Hold an exclusive lock on ``workdir`` (``flock`` of ``workdir/.train.lock``, released when
    the process ends, even by ``kill -9``) while a run trains into it: a second run started on the
    same folder would interleave its checkpoints with this one's and delete them by its own
    keep-last-N policy. Raises a :class:`UserError` naming the holder (pid and host); on a file
    system without ``flock`` support the run goes on unlocked, with a warning. A run refused before
    it wrote anything leaves no lock file behind, and a folder this call created is removed (the
    CLI removes the empty ``--workdir`` it created itself)."""
    import fcntl
    import socket
    folder = Path(workdir)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    f = open(folder / LOCK_FILE, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown process"
        f.close()
        raise UserError(f"--workdir {workdir}: another training run is using this folder ({holder}); "
                        f"wait for it to end or choose another --workdir") from None
    except OSError as e:                    # e.g. a network file system without locks
        log.warning("could not lock %s (%s); make sure no other run trains into it", folder, e)
        f.close()
        yield
        return
    try:
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        yield
    finally:
        if [p.name for p in folder.iterdir()] == [LOCK_FILE]:   # nothing written: a refused run
            (folder / LOCK_FILE).unlink(missing_ok=True)      # before the unlock: no one holds it
            if created:
                folder.rmdir()
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


def _is_complete(step_dir: Path) -> bool:
    return not _missing_items(step_dir, ITEMS)


def complete_steps(directory) -> list[int]:
    """Sorted steps of the complete checkpoints in ``directory`` (read from the folder names, no
    Orbax manager; an interrupted write, Orbax's ``<step>.orbax-checkpoint-tmp*`` folder, is not
    listed). ``[]`` when the folder does not exist."""
    d = Path(directory)
    if not d.is_dir():
        return []
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and _is_complete(p))


# --------------------------------------------------------------------------------------------------
# Inference loading
# --------------------------------------------------------------------------------------------------
def resolve(path, step="best") -> tuple[Path, int]:
    """(checkpoint directory, step) for a workdir, its ``checkpoints/`` folder or one step folder.

    ``step``: "best" (highest AP, else latest), "latest", or an int.
    """
    p = Path(path).absolute()
    if not p.exists():
        raise InputPathError(f"checkpoint path {p} does not exist")
    if not p.is_dir():
        raise InputPathError(f"{p} is a file; expected a training run folder (its checkpoints/ "
                             f"holds <step>/ folders written by damo_jax.train.loop)")
    if (p / "_CHECKPOINT_METADATA").is_file() and p.name.isdigit():
        return p.parent, int(p.name)
    if (p / CKPT_SUBDIR).is_dir():
        p = p / CKPT_SUBDIR
    ck = Checkpoints(p, read_only=True)
    steps = ck.steps()
    if not steps:
        raise InputPathError(f"no complete checkpoint in {p} (expected <step>/ folders written by "
                                f"damo_jax.train.loop)")
    if step == "latest":
        chosen = ck.latest_step()
    elif step == "best":
        chosen = ck.best_step() or ck.latest_step()
        _warn_unevaluated_newer(p, ck.latest_step(), chosen)
    else:
        try:
            chosen = int(step)
        except (TypeError, ValueError):
            raise ConfigError(f"checkpoint step {step!r}: expected 'best', 'latest' or a step "
                              f"number") from None
        if chosen not in steps:
            raise InputPathError(f"checkpoint step {chosen} not in {p} (have {steps})")
    return p, int(chosen)


_WARNED_UNEVALUATED: set = set()


def _warn_unevaluated_newer(directory: Path, latest: int | None, chosen: int) -> None:
    """Warn when "best" passes over a newer checkpoint whose evaluation never ran (its run was
    stopped during it: ``meta["eval_pending"]``): it may be the best one, unknown until evaluated."""
    if latest is None or latest == chosen:
        return
    try:
        pending = json.loads((directory / str(latest) / "meta" / "metadata").read_text()).get("eval_pending")
    except (OSError, ValueError, AttributeError):
        return
    if pending and (str(directory), latest) not in _WARNED_UNEVALUATED:    # once per process
        _WARNED_UNEVALUATED.add((str(directory), latest))
        log.warning("checkpoint %s/%d (the newest) was not evaluated: its run stopped during the "
                    "evaluation; using the best evaluated one, step %d. Rerun the training command to "
                    "evaluate it, or choose it with --checkpoint %s",
                    directory, latest, chosen, shlex.quote(f"{directory}/{latest}"))


class CheckpointCorruptError(UserError, ValueError):
    """A checkpoint step that misses items or whose files cannot be read (names step and folder)."""


def _missing_items(step_dir: Path, items) -> list[str]:
    names = ["_CHECKPOINT_METADATA"] if not (step_dir / "_CHECKPOINT_METADATA").is_file() else []
    return names + [item for item in items if not (step_dir / item).is_dir()]


def _restore_for_inference(directory: Path, step: int, items) -> dict:
    """``restore_items`` with the load errors of a partial / corrupt step (a missing item, an
    empty step folder, truncated array files) as one :class:`CheckpointCorruptError`."""
    ck = Checkpoints(directory, read_only=True)
    others = [s for s in complete_steps(directory) if s != step]
    hint = (f"; complete steps: {others}, choose one with --checkpoint "
            f"{shlex.quote(str(directory))}/<step>"
            if others else "")
    missing = _missing_items(directory / str(step), items)
    if missing:
        raise CheckpointCorruptError(f"step {step} in {directory} is incomplete or corrupt "
                                     f"(missing {', '.join(missing)}){hint}")
    try:
        with _quiet_shutdown_noise():
            out = ck.restore_items(step, items=items)
    except Exception as e:  # noqa: BLE001 - orbax re-raises tensorstore read errors as bare Exception
        raise CheckpointCorruptError(f"step {step} in {directory} is incomplete or corrupt "
                                     f"({root_cause(e)}){hint}") from e
    if "meta" in out:
        try:
            check_digest({k: v for k, v in out.items() if k != "meta"}, out["meta"],
                         f"checkpoint {directory}/{step}")
        except CheckpointCorruptError as e:
            raise CheckpointCorruptError(f"{e}{hint}") from None
    return out


def load_meta(path, step="best") -> dict:
    directory, chosen = resolve(path, step)
    return _restore_for_inference(directory, chosen, ("meta",))["meta"]


def load_for_inference(path, *, step="best", which: str = "ema"):
    """``(config, variables, class_names)`` of a training checkpoint, for eval / predict / export.

    ``variables = {"params", "batch_stats"}`` of the EMA model (``which="ema"``, default — what the
    official code evaluates) or of the raw model (``which="model"``). ``config.model.head.num_classes``
    and ``config.model.class_names`` are those of the trained model.
    """
    if which not in ("ema", "model"):
        raise ValueError(f"load_for_inference(which={which!r}): expected 'ema' or 'model'")
    directory, chosen = resolve(path, step)
    items = _restore_for_inference(directory, chosen, ("ema" if which == "ema" else "state", "meta"))
    meta = items["meta"]
    config = config_from_json(meta["config"])
    class_names = tuple(meta.get("class_names") or config.model.class_names)
    if which == "ema":
        variables = dict(items["ema"])
    else:
        variables = {"params": items["state"]["params"], "batch_stats": items["state"]["batch_stats"]}
    log.info("loaded %s weights of step %d from %s", which, chosen, directory)
    return config, variables, class_names
