"""Multi-process (multi-host) runs: start-up, the process-slice check, gathers, fail-fast exit.

One JAX process per host (TPU VM worker, GPU node) or, on one machine, several CPU processes that
talk over gloo (how tests/test_multiprocess.py runs the real thing on localhost):

* :func:`initialize` — ``jax.distributed.initialize`` with the coordinator / process count / id
  from the environment (``JAX_COORDINATOR_ADDRESS`` host:port of process 0, ``JAX_NUM_PROCESSES``,
  ``JAX_PROCESS_ID``) or auto-detected (TPU pod slices, SLURM, Open MPI). CPU collectives use gloo.
  A process that dies stops sending heartbeats; every other process is then terminated by the
  coordination service after ``DAMO_JAX_HEARTBEAT_TIMEOUT_S`` seconds (default 100, JAX's) with
  "Terminating process because the JAX distributed service detected fatal errors ... another task
  died": never a silent hang. (``jax_share_binary_between_hosts`` is NOT used: with the persistent
  cache only process 0 hits it, and the others then wait for a binary that is never shared.)
* :func:`check_process_slices` — all-gathers the global-batch rows each process read (and the image
  ids it got for them) and raises unless the rows are disjoint, cover the global batch and hold
  the global batch's images.
* :func:`barrier` — every process waits for the others at the coordination service (not a device
  collective). Gloo gives a new collective context only 30 s for all processes to arrive, and
  compilation times differ between processes by more than that on a loaded host, so the first
  update step (compiled ahead) and every all-gather are preceded by a barrier.
* :func:`allgather_rows` — numpy values of process-local or globally sharded arrays, concatenated
  over processes along axis 0 (int64 / float64 survive without ``jax_enable_x64``).
* :func:`compile_cached` — ``lowered.compile()``, and on processes other than 0 of a multi-process
  CPU run an executable cache of their own beside JAX's persistent cache: JAX writes its cache from
  process 0 only, and on the CPU backend the cache key differs between processes (it hashes the
  process's devices and compile options), so without it every process but 0 compiles the update
  step again at every start or restart (minutes on a 2-core host).
* :func:`check_same_settings` — before any work, every process compares the run's config with
  the others' and (:func:`check_shared_workdir`) checks that it sees the run folder process 0
  sees: process 0 writes a file with a random token into ``--workdir`` and every other process
  must read it back (a folder on a disk the hosts do not share froze the run at its first
  checkpoint for 20 minutes, then blamed disk space). Either mismatch is one error line in every
  process, exit 2.
* :func:`exit_on_error` — in a multi-process run, an exception in ONE process prints
  ``error: process i/n: ...`` and hard-exits that process (``os._exit(1)``; a user error, e.g. a
  batch size the devices do not divide: one line, no traceback, exit 2), so the others are
  stopped by the heartbeat instead of waiting in a collective or a shutdown barrier.
"""
from __future__ import annotations

import hashlib
import itertools
import os
import sys
import threading
import traceback

import numpy as np

from damo_jax.errors import EXIT_USER_ERROR, ConfigError

HEARTBEAT_ENV = "DAMO_JAX_HEARTBEAT_TIMEOUT_S"
INIT_TIMEOUT_ENV = "DAMO_JAX_INIT_TIMEOUT_S"
BARRIER_TIMEOUT_ENV = "DAMO_JAX_BARRIER_TIMEOUT_S"
_BARRIER_IDS = itertools.count()


def requested(multihost: bool, env=os.environ) -> bool:
    """--multihost, or an environment that describes several processes (JAX coordinator, a
    multi-worker TPU slice, SLURM / Open MPI with more than one task)."""
    return bool(multihost or env.get("JAX_COORDINATOR_ADDRESS")
                or "," in env.get("TPU_WORKER_HOSTNAMES", "")
                or int(env.get("SLURM_NTASKS", "1") or 1) > 1
                or int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1)


def initialize(multihost: bool, env=os.environ) -> bool:
    """``jax.distributed.initialize`` when :func:`requested`; returns whether it ran.

    Must run before the first JAX computation. Coordinator, process count and id come from
    ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` when set, otherwise
    from JAX's cluster auto-detection (Cloud TPU, SLURM, Open MPI)."""
    if not requested(multihost, env):
        return False
    import jax
    if str(jax.config.jax_cpu_collectives_implementation or "none") == "none":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")   # CPU processes talk over gloo
    timeout = int(env.get(INIT_TIMEOUT_ENV, 300))
    # JAX's coordination service aborts the process (C++ fatal error, "another task died") when
    # not every process joins in time: say what happened first, as one error line (exit 2)
    watchdog = threading.Timer(max(1.0, timeout - 1.0), _join_timed_out, args=(env, timeout))
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(
            coordinator_address=env.get("JAX_COORDINATOR_ADDRESS") or None,
            num_processes=int(env["JAX_NUM_PROCESSES"]) if env.get("JAX_NUM_PROCESSES") else None,
            process_id=int(env["JAX_PROCESS_ID"]) if env.get("JAX_PROCESS_ID") else None,
            initialization_timeout=timeout,
            heartbeat_timeout_seconds=int(env.get(HEARTBEAT_ENV, 100)))
    finally:
        watchdog.cancel()
    _orbax_coordination_barriers()
    return True


def _join_timed_out(env, timeout: int) -> None:
    where = env.get("JAX_COORDINATOR_ADDRESS") or "the coordinator"
    who = (f"process {env.get('JAX_PROCESS_ID')}/{env.get('JAX_NUM_PROCESSES')}"
           if env.get("JAX_PROCESS_ID") else "this process")
    print(f"error: {who}: not every process joined {where} within {timeout} s ({INIT_TIMEOUT_ENV}); "
          f"start all of them with the same --coordinator and --num-processes and distinct "
          f"--process-id values", file=sys.stderr, flush=True)
    os._exit(2)


def _orbax_coordination_barriers() -> None:
    """Orbax's barriers through the coordination service (with timeouts) instead of device
    collectives, which gloo gives up on when processes arrive more than 30 s apart."""
    from absl import flags
    import orbax.checkpoint  # noqa: F401 - defines the flag
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    flags.FLAGS.experimental_orbax_use_distributed_barrier = True


def barrier(name: str, timeout_s: float | None = None) -> None:
    """Block until every process calls ``barrier`` with the same ``name`` (the n-th call of each
    process meets the n-th of the others). Raises after ``timeout_s`` (default
    ``DAMO_JAX_BARRIER_TIMEOUT_S`` or 1800 s); a dead process is caught sooner by the heartbeat."""
    import jax
    if jax.process_count() == 1:
        return
    from jax._src import distributed as jax_distributed
    timeout_s = float(timeout_s or os.environ.get(BARRIER_TIMEOUT_ENV, 1800))
    jax_distributed.global_state.client.wait_at_barrier(f"damo_jax/{name}/{next(_BARRIER_IDS)}",
                                                        int(timeout_s * 1000))


def allgather_rows(tree, sharding=None):
    """Every leaf, concatenated over processes along axis 0, as numpy (all processes get it).

    Leaves are process-local numpy arrays (each process's rows, same shape on all processes) or
    ``jax.Array`` s sharded along axis 0 over the global mesh (their global value is returned).
    ``sharding``: the numpy leaves are first placed as global arrays with it (as the batch rows
    that made the jax leaves), so that their rows line up with those leaves' whatever order the
    mesh gives the processes' devices; without it they are gathered in process order.
    One process: the leaves' values, unchanged."""
    import jax
    from jax.experimental import multihost_utils

    barrier("allgather")                  # all processes at the collective within gloo's 30 s

    def one(x):
        if isinstance(x, jax.Array):
            if jax.process_count() == 1 or x.is_fully_addressable:
                return np.asarray(x)
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        x = np.asarray(x)
        if jax.process_count() == 1:
            return x
        wide = x.dtype.itemsize == 8
        y = np.ascontiguousarray(x.reshape(x.shape[0], -1))
        if wide:
            y = y.view(np.int32)                  # (rows, 2·k): exact for int64 / float64
        if sharding is not None:
            y = jax.make_array_from_process_local_data(sharding, y)
        out = np.asarray(multihost_utils.process_allgather(y, tiled=True))
        if wide:
            out = np.ascontiguousarray(out).view(x.dtype)
        return out.reshape(-1, *x.shape[1:])

    return jax.tree.map(one, tree)


def check_process_slices(rows, values, expected) -> None:
    """Raise unless the processes' global-batch ``rows`` are disjoint and cover the global batch,
    and what each process read for its rows is what the global batch holds there.

    rows: (L,) this process's rows of the global batch; values: (L,) what it read for them (e.g.
    source image ids); expected: (B,) the values of the whole global batch (every process computes
    them without reading the data)."""
    import jax
    got = allgather_rows({"rows": np.asarray(rows, np.int32)[None],
                          "values": np.asarray(values, np.int64)[None]})
    all_rows, all_values = got["rows"].reshape(-1), got["values"].reshape(-1)
    expected = np.asarray(expected, np.int64)
    if sorted(all_rows.tolist()) != list(range(len(expected))):
        raise RuntimeError(f"process slices of the global batch overlap or leave gaps: rows per "
                           f"process {got['rows'].tolist()} (global batch {len(expected)}, "
                           f"{jax.process_count()} processes)")
    if not np.array_equal(all_values, expected[all_rows]):
        raise RuntimeError(f"the processes read {got['values'].tolist()} for their rows "
                           f"{got['rows'].tolist()} of the global batch, expected {expected.tolist()}")


class SettingsMismatchError(ConfigError):
    """The processes of one run were started with different settings (raised in every process)."""


def check_same_settings(settings: dict, workdir=None) -> None:
    """Raise :class:`SettingsMismatchError` in EVERY process unless all processes hold the same
    ``settings`` (flat ``{key: value}``, e.g. the run's config): a process started with another
    learning rate or seed would train its own model copy silently, another batch size would
    crash in a collective. Every process gets the same verdict (the digests are all-gathered),
    and the message names the keys that differ from process 0's, process by process.
    ``workdir``: then also :func:`check_shared_workdir` (:class:`WorkdirNotSharedError`)."""
    import jax
    if jax.process_count() == 1:
        return
    _check_same_values(settings)
    if workdir is not None:
        check_shared_workdir(workdir)


def _check_same_values(settings: dict) -> None:
    import json

    import jax
    text = json.dumps(settings, sort_keys=True, default=repr).encode()
    digest = np.frombuffer(hashlib.sha256(text).digest()[:16], np.int32)
    digests = allgather_rows({"d": digest[None]})["d"]
    differ = [i for i in range(len(digests)) if not np.array_equal(digests[i], digests[0])]
    if not differ:
        return
    lengths = allgather_rows({"n": np.array([[len(text)]], np.int32)})["n"].reshape(-1)
    padded = np.zeros((1, int(lengths.max())), np.int32)
    padded[0, :len(text)] = np.frombuffer(text, np.uint8)
    texts = allgather_rows({"t": padded})["t"]
    each = [json.loads(bytes(texts[i, :lengths[i]].astype(np.uint8)).decode()) for i in range(len(texts))]
    parts = []
    for i in differ:
        keys = sorted(k for k in set(each[0]) | set(each[i]) if each[0].get(k) != each[i].get(k))
        shown = ", ".join(f"{k} = {each[i].get(k)!r} (process 0: {each[0].get(k)!r})" for k in keys[:4])
        parts.append(f"process {i}: {shown}" + (f" and {len(keys) - 4} more" if len(keys) > 4 else ""))
    raise SettingsMismatchError(f"the {len(each)} processes were started with different settings — "
                                f"{'; '.join(parts)}; start every process with the same command and "
                                f"--config overrides")


class WorkdirNotSharedError(SettingsMismatchError):
    """The processes of one run do not see one run folder (raised in every process)."""


#: the file process 0 writes into the run folder for :func:`check_shared_workdir` (+ a random token)
SHARED_MARKER_PREFIX = ".damo_jax_shared_check_"
#: how long the other processes look for it (a network file system may show a new file late)
SHARED_MARKER_WAIT_S = 10.0


def check_shared_workdir(workdir) -> None:
    """Raise :class:`WorkdirNotSharedError` in EVERY process unless every process sees the run
    folder process 0 sees. Checkpoints are written by all processes together into one folder: on
    folders the hosts do not share (the same path on each node's local disk) the first checkpoint
    waited in Orbax's barriers for 20 minutes, then failed as a write error.

    Process 0 writes ``<workdir>/.damo_jax_shared_check_<token>`` holding ``<token>`` (16 random
    bytes, new for every run: a file left by an earlier run never matches); the token is
    all-gathered; every other process must read that file with that content within
    ``SHARED_MARKER_WAIT_S`` seconds; the verdicts are all-gathered (every process raises alike),
    then process 0 removes the file. Costs two all-gathers when the folder is shared."""
    import jax
    if jax.process_count() == 1:
        return
    from pathlib import Path
    import time
    folder = Path(workdir)
    me, count = jax.process_index(), jax.process_count()
    token = np.zeros((1, 4), np.int32)
    wrote = np.ones((1, 1), np.int32)
    marker, write_error = None, ""
    if me == 0:
        token[0] = np.frombuffer(os.urandom(16), np.int32)
        marker = folder / f"{SHARED_MARKER_PREFIX}{token.tobytes().hex()}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            _remove_stale_markers(folder)
            tmp = marker.with_name(marker.name + ".tmp")
            tmp.write_text(token.tobytes().hex())
            os.replace(tmp, marker)
        except OSError as err:
            wrote[0, 0] = 0
            write_error = f": {err.strerror or err} (errno {err.errno})" if err.errno else f": {err}"
    got = allgather_rows({"token": token, "wrote": wrote})
    hex_token = got["token"][0].astype(np.int32).tobytes().hex()
    seen = np.ones((1, 1), np.int32)
    if me != 0 and got["wrote"][0, 0]:
        path, deadline = folder / f"{SHARED_MARKER_PREFIX}{hex_token}", time.monotonic() + SHARED_MARKER_WAIT_S
        while True:
            try:
                if path.read_text().strip() == hex_token:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                seen[0, 0] = 0
                break
            time.sleep(0.2)
    seen_all = allgather_rows({"seen": seen})["seen"].reshape(-1)
    if marker is not None:
        try:
            marker.unlink()
        except OSError:
            pass
    if not got["wrote"][0, 0]:
        reason = write_error or " (the reason is in process 0's output)"
        raise WorkdirNotSharedError(f"--workdir {workdir}: process 0 of {count} could not write a file "
                                    f"into its run folder{reason}; fix the folder's permissions or "
                                    f"choose another --workdir")
    blind = [i for i in range(count) if not seen_all[i]]
    if blind:
        who = (f"process {blind[0]} does" if len(blind) == 1
               else f"processes {', '.join(map(str, blind))} do")
        raise WorkdirNotSharedError(
            f"--workdir {workdir}: {who} not see the file process 0 wrote into its run folder "
            f"({SHARED_MARKER_PREFIX}...) within {SHARED_MARKER_WAIT_S:g} s; the {count} processes "
            f"must share ONE run folder: on several hosts a folder on a shared file system mounted "
            f"at the same path on each (NFS, Lustre, a FUSE-mounted bucket), on one machine the same "
            f"--workdir for every process")


def _remove_stale_markers(folder, older_than_s: float = 3600.0) -> None:
    """Markers an earlier run's process 0 left behind (it died during the check)."""
    import time
    for old in folder.glob(f"{SHARED_MARKER_PREFIX}*"):
        try:
            if time.time() - old.stat().st_mtime > older_than_s:
                old.unlink()
        except OSError:
            pass


OWN_CACHE_SUBDIR = "damo_jax_process_executables"


def own_cache_path(lowered):
    """Where a process other than 0 of a multi-process CPU run keeps ``lowered`` compiled: under
    JAX's persistent cache folder (a local path; None when there is none, for process 0, one
    process or another backend). The file name hashes the lowered module's text, the jax/jaxlib
    versions, XLA_FLAGS, this process's index and the devices (ids and processes) of the run."""
    import jax
    import jaxlib
    if jax.process_count() == 1 or jax.process_index() == 0 or jax.default_backend() != "cpu":
        return None
    root = jax.config.jax_compilation_cache_dir
    if not root or "://" in str(root):
        return None
    h = hashlib.sha256()
    for part in (lowered.as_text(), jax.__version__, jaxlib.__version__, os.environ.get("XLA_FLAGS", ""),
                 f"{jax.process_index()}/{jax.process_count()}",
                 repr([(d.id, d.process_index) for d in jax.devices()])):
        h.update(str(part).encode())
        h.update(b"\0")
    from pathlib import Path
    return Path(root) / OWN_CACHE_SUBDIR / f"p{jax.process_index()}-{h.hexdigest()[:40]}.bin"


def compile_cached(lowered, log=None):
    """``lowered.compile()``, through :func:`own_cache_path` where that applies: a stored
    executable is loaded (``jax.experimental.serialize_executable``), else the module is compiled
    and stored (atomically: written to a temporary file, then renamed). A file that fails to load
    is reported in one line and compiled over; nothing here can fail the run that the plain
    ``compile()`` would not."""
    path = own_cache_path(lowered)
    if path is None:
        return lowered.compile()
    import jax
    log = log or (lambda msg: print(f"process {jax.process_index()}: {msg}", file=sys.stderr, flush=True))
    from jax.experimental import serialize_executable
    if path.is_file():
        try:
            compiled = serialize_executable.deserialize_and_load(path.read_bytes(), lowered.in_tree,
                                                                 lowered.out_tree)
            log(f"loaded the compiled update step from {path}")
            return compiled
        except Exception as err:  # noqa: BLE001 - a stale or truncated file: compile instead
            log(f"warning: could not load {path} ({type(err).__name__}: {err}); compiling instead")
    compiled = lowered.compile()
    try:
        payload, _, _ = serialize_executable.serialize(compiled)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        tmp.write_bytes(payload)
        os.replace(tmp, path)
    except Exception as err:  # noqa: BLE001 - the cache is an optimisation
        log(f"warning: could not store the compiled update step in {path}: {type(err).__name__}: {err}")
    return compiled


def exit_on_error(fn, *args, passthrough: tuple = (), **kwargs):
    """``fn(*args, **kwargs)``; in a multi-process run an exception prints ``error: process i/n:``
    with its traceback and ends THIS process at once (``os._exit(1)``; a user error
    (:func:`damo_jax.errors.user_error_types`, e.g. a batch size the devices do not divide): one
    line without traceback and exit 2 (:func:`_exit_user_error`), the traceback with ``--debug`` /
    ``DAMO_JAX_DEBUG=1``; an interrupt: one
    ``interrupted (SIGINT|SIGTERM)`` line and ``os._exit(128 + signal)``, as the train CLI exits):
    the other processes are then stopped by the distributed heartbeat instead of hanging in a
    collective. Exceptions of the
    ``passthrough`` types (raised alike by every process, e.g. a non-finite loss, which all
    processes see) propagate normally."""
    import jax
    if jax.process_count() == 1:
        return fn(*args, **kwargs)
    try:
        return fn(*args, **kwargs)
    except passthrough:
        raise
    except BaseException as err:  # noqa: BLE001 - any failure must end the whole job
        if isinstance(err, SystemExit) and not err.code:
            raise
        if isinstance(err, KeyboardInterrupt):      # Ctrl-C / SIGTERM: the documented line, no traceback
            import signal
            signum = int(getattr(err, "signum", signal.SIGINT))
            print(f"interrupted ({signal.Signals(signum).name}) in process {jax.process_index()}/"
                  f"{jax.process_count()}: exiting so the other processes stop; the same command on "
                  f"every process resumes from the latest complete checkpoint", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(128 + signum)
        from damo_jax.errors import debug_enabled, user_error_types
        if isinstance(err, user_error_types()) and not debug_enabled(sys.argv):
            _exit_user_error(err)
        traceback.print_exc()
        print(f"error: process {jax.process_index()}/{jax.process_count()}: {type(err).__name__}: {err}; "
              f"exiting so the other processes stop (distributed heartbeat)", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)


#: how long a process that hit a user error waits for the others to hit one too (same mistake)
USER_ERROR_WAIT_S = 30.0


def _exit_user_error(err: BaseException) -> None:
    """A user error in a multi-process run: ``error: process i/n: <message>`` (one line, as the
    CLI prints user errors), then exit 2. A mistake every process makes (a batch size the devices
    do not divide) reaches every process at the same point: they meet at a barrier and leave the
    distributed runtime together (``jax.distributed.shutdown``), so each exits 2 itself instead of
    being aborted when process 0 (the coordinator) is gone. A process that is alone with its error
    (no peer at the barrier within ``USER_ERROR_WAIT_S``) exits 2 all the same; the others are
    then stopped by the heartbeat. ``os._exit``: never the interpreter's exit, which could wait on
    a collective or on Orbax's writer threads."""
    import jax
    from damo_jax.errors import one_line
    print(f"error: process {jax.process_index()}/{jax.process_count()}: {one_line(err)}",
          file=sys.stderr, flush=True)
    sys.stdout.flush()
    try:
        barrier("user_error", timeout_s=USER_ERROR_WAIT_S)
    except Exception:  # noqa: BLE001 - not every process failed: exit alone
        pass
    else:
        try:
            jax.distributed.shutdown()
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass
    sys.stderr.flush()
    os._exit(EXIT_USER_ERROR)
