"""Real multi-process (multi-host) training on localhost: 2 processes × 2 CPU devices.

Each run is ``python -m damo_jax.train --multihost`` started like on a cluster: coordinator
``127.0.0.1:<free port>``, ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` in the environment, one
shared workdir; JAX's distributed runtime (coordination service + gloo CPU collectives) connects
them. The program: a small DAMO-YOLO-Ns-shaped network (the Ns config with a one-block-per-stage
TinyNAS structure file, narrower channels and one block per neck node, ``train_setup.TINY_*``: 138 k parameters with the demo's 6 classes, so that
the XLA compilations that dominate these short runs take a fraction of the full Ns's; native conv
gradients, no child-process precompile) at 64×64 on the demo set (``demo:64``, generated once into
the cache), global batch 4, SGD, 4 steps, checkpoints at steps 2 and 4, evaluation (EMA, 100 val
images) at step 4. Checked:

* the 2-process run ends with the params, BN statistics and EMA of a 1-process 4-device run
  (max |Δ| ≤ 1e-5 · max(1, max |value|) per tensor; the global batch, the shards per device and
  the update are the same, only the all-reduce runs over gloo instead of in-process) and the SAME
  evaluation metrics (the eval batches are split over the processes and the detections gathered;
  their count agrees within 0.1 %, so the gathered set is not empty);
* every process read a disjoint slice of the global batch (the run all-gathers the rows and image
  ids each process read and asserts it; the log line is checked here);
* only process 0 writes logs and pictures (one record per step in metrics.jsonl, one TensorBoard
  file, no log lines from process 1);
* a process that dies mid-run makes the other exit with an error naming the cause within a
  bounded time (heartbeat timeout 10 s here), never a silent hang: process 1 stops before step 3
  (after the step-2 checkpoint) and is killed (SIGKILL) while process 0 waits in step 3's
  collectives; this run is started with the CLI flags (``--coordinator`` ...) instead of the
  environment;
* after that run (both processes dead), re-running the same command restores the step-2 checkpoint
  in both processes and ends bit-for-bit where the uninterrupted run ended; process 1 loads the
  update step it compiled in the first 2-process run from its own executable cache
  (``distributed.compile_cached``) in both later runs.
* start-up mistakes are one error line per process and exit 2, nothing trained: processes started
  with other --config overrides, processes that do not share the workdir (another --workdir for
  process 1: refused in seconds by the shared-folder check instead of freezing at the first
  checkpoint), a global batch the 4 devices do not divide (a user error found after the
  distributed start: no traceback).

Every wait has a timeout; on failure all started processes are killed and their logs shown.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from train_setup import TINY_MODEL_LINES, write_tiny_config

ROOT = Path(__file__).resolve().parent.parent
STEPS = 4
RUN_TIMEOUT = 900          # one whole run (compilation on a loaded 2-core machine included)
DEATH_BOUND = 120          # seconds for the survivor to exit after its peer died (heartbeat 10 s)
SHARED_MARKER_PREFIX = ".damo_jax_shared_check_"   # distributed.SHARED_MARKER_PREFIX

CONFIG = '''"""Tiny multi-process test run: a small Ns-shaped network at 64x64 on demo:64, batch 4, SGD, 4 steps."""
from pathlib import Path

from damo_jax.config import load_config


def get_config():
    c = load_config("ns")
''' + TINY_MODEL_LINES + '''    c.model.grad_impl = "native"             # the CPU matmul gradients are tested in test_conv_grad
    c.train.precompile = "off"               # tested in test_precompile
    c.data.train = "demo:64"
    c.data.image_size = (64, 64)
    c.data.mosaic_size = (64, 64)
    c.data.max_boxes = 8
    c.data.workers = 0
    c.train.batch_size = 4
    c.train.optimizer = "sgd"
    c.train.weight_decay = 5e-4
    c.train.epochs = 1
    c.train.warmup_epochs = 0
    c.train.no_aug_epochs = 0
    c.train.max_steps = 4
    c.train.ckpt_every_steps = 2
    c.train.log_every_steps = 1
    c.train.keep_checkpoints = 5
    c.train.base_lr_per_img = 0.01 / 16
    c.test.image_size = (64, 64)
    c.test.batch_size = 4
    c.test.conf_thre = 0.001      # an almost untrained model: keep low scores so there are detections
    return c
'''


@pytest.fixture(scope="module")
def shared():
    d = Path(tempfile.mkdtemp(prefix="damo_mp_test_"))
    write_tiny_config(d, "mp_tiny.py", CONFIG)
    (d / "xla").mkdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _xla_cache(shared: Path) -> str:
    """Per-session XLA cache; DAMO_JAX_TEST_XLA_CACHE keeps one across sessions (development)."""
    return os.environ.get("DAMO_JAX_TEST_XLA_CACHE") or str(shared / "xla")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(shared: Path, devices: int, **extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DAMO_JAX_TEST_", "JAX_", "XLA_", "TPU_", "SLURM_", "OMPI_"))}
    # XLA:CPU backend optimisation off: the 4-step runs take seconds, while an optimised compile of
    # the update step takes minutes per process on a 2-core runner (and a 2-process run compiles in
    # both). All runs compared here use the same flags.
    flags = (f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0 "
             "--xla_llvm_disable_expensive_passes=true")
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=flags,
               JAX_COMPILATION_CACHE_DIR=_xla_cache(shared), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               PYTHONUNBUFFERED="1", DAMO_JAX_HEARTBEAT_TIMEOUT_S="10", DAMO_JAX_INIT_TIMEOUT_S="300")
    env.update(extra)
    return env


class Job:
    """The processes of one run; logs in <workdir>.logs/p<i>.{out,err}."""

    def __init__(self, shared: Path, workdir: Path, processes: int, env_per_process=None, flags=False,
                 logs: str = "logs", args_per_process=None):
        """``flags``: coordinator / process count / id as CLI flags (--coordinator, --num-processes,
        --process-id) instead of JAX_* environment variables; logs go to ``<workdir>.<logs>``;
        ``args_per_process``: {i: [more command-line arguments of process i]}."""
        self.workdir, self.logs = workdir, Path(f"{workdir}.{logs}")
        self.logs.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "damo_jax.train", "--config", str(shared / "mp_tiny.py"),
               "--workdir", str(workdir), "--no-progress"]
        port = _free_port()
        self.procs = []
        for i in range(processes):
            extra = dict((env_per_process or {}).get(i, {}))
            if processes > 1 and flags:
                cmd_i = cmd + ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(processes),
                               "--process-id", str(i)]
            elif processes > 1:
                cmd_i = cmd + ["--multihost"]
                extra.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(processes),
                             JAX_PROCESS_ID=str(i))
            else:
                cmd_i = cmd
            cmd_i = cmd_i + list((args_per_process or {}).get(i, []))
            env = _env(shared, 4 // processes, **extra)
            with open(self.logs / f"p{i}.out", "w") as out, open(self.logs / f"p{i}.err", "w") as err:
                self.procs.append(subprocess.Popen(cmd_i, cwd=ROOT, env=env, stdout=out, stderr=err))

    def text(self, i: int, stream: str = "err") -> str:
        return (self.logs / f"p{i}.{stream}").read_text(errors="replace")

    def dump(self) -> str:
        return "\n".join(f"--- process {i} {s} ---\n{self.text(i, s)[-4000:]}"
                         for i in range(len(self.procs)) for s in ("out", "err"))

    def kill(self, i: int | None = None) -> None:
        for j, p in enumerate(self.procs):
            if (i is None or i == j) and p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait(timeout=30)

    def wait(self, timeout: float = RUN_TIMEOUT) -> list[int]:
        deadline = time.monotonic() + timeout
        try:
            return [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in self.procs]
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"run in {self.workdir} did not finish within {timeout} s\n{self.dump()}")

    def wait_for(self, i: int, text: str, timeout: float = RUN_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.text(i, "out") + self.text(i, "err"):
            if self.procs[i].poll() is not None or time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"process {i} never printed {text!r}\n{self.dump()}")
            time.sleep(0.5)


def _finish(job: Job) -> Job:
    """Wait for every process of ``job`` and assert that all exited with 0."""
    codes = job.wait()
    assert codes == [0] * len(job.procs), f"exit codes {codes}\n{job.dump()}"
    return job


@pytest.fixture(scope="module")
def first_runs(shared):
    """The 1-process 4-device run and the 2-process run, started together (their compilations are
    mostly single-threaded, so on a 2-core host they overlap instead of adding up)."""
    jobs = {"one_process": Job(shared, shared / "one_process", 1),
            "two_processes": Job(shared, shared / "two_processes", 2)}
    for job in jobs.values():
        _finish(job)
    return jobs


@pytest.fixture(scope="module")
def one_process(first_runs):
    return first_runs["one_process"]


@pytest.fixture(scope="module")
def two_processes(first_runs):
    return first_runs["two_processes"]


def _state(workdir: Path, step: int = STEPS) -> dict:
    from damo_jax.train.checkpoint import Checkpoints
    items = Checkpoints(workdir / "checkpoints", read_only=True).restore_items(step, items=("state", "ema"))
    return jax.tree.map(np.asarray, {"state": dict(items["state"]), "ema": dict(items["ema"])})


def _records(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_two_processes_equal_one_process_with_four_devices(one_process, two_processes):
    a, b = _state(one_process.workdir), _state(two_processes.workdir)
    start = _state(one_process.workdir, 2)
    assert int(a["state"]["step"]) == int(b["state"]["step"]) == STEPS
    worst = {}
    for name, tree_a, tree_b in (("params", a["state"]["params"], b["state"]["params"]),
                                 ("batch_stats", a["state"]["batch_stats"], b["state"]["batch_stats"]),
                                 ("ema_params", a["ema"]["params"], b["ema"]["params"]),
                                 ("ema_batch_stats", a["ema"]["batch_stats"], b["ema"]["batch_stats"])):
        la, lb = jax.tree_util.tree_leaves_with_path(tree_a), jax.tree_util.tree_leaves_with_path(tree_b)
        assert [p for p, _ in la] == [p for p, _ in lb]
        rel = [(float(np.abs(x - y).max() / max(1.0, float(np.abs(x).max()))), jax.tree_util.keystr(p))
               for (p, x), (_, y) in zip(la, lb)]
        worst[name] = max(rel)
        assert worst[name][0] <= 1e-5, (name, worst[name])
    # not vacuous: steps 3-4 moved the parameters far more than the two runs differ
    moved = max(float(np.abs(x - y).max()) for x, y in
                zip(jax.tree.leaves(a["state"]["params"]), jax.tree.leaves(start["state"]["params"])))
    apart = max(float(np.abs(x - y).max()) for x, y in
                zip(jax.tree.leaves(a["state"]["params"]), jax.tree.leaves(b["state"]["params"])))
    print("1 vs 2 processes, worst per-tensor relative difference:", worst,
          f"largest |params 1p - 2p| {apart:.3g}, largest step-2->4 move {moved:.3g}")
    assert moved > 100 * apart and moved > 1e-5
    eval_a = [r for r in _records(one_process.workdir) if r["kind"] == "eval"]
    eval_b = [r for r in _records(two_processes.workdir) if r["kind"] == "eval"]
    assert [r["step"] for r in eval_a] == [r["step"] for r in eval_b] == [STEPS]
    print("eval (1 process):", eval_a[0], "\neval (2 processes):", eval_b[0])
    # the COCO metrics are identical; the detection count (scores down to conf 0.001 of an untrained
    # model) may differ by a box or two at the threshold / NMS ties (params differ by ~1e-7)
    count_a, count_b = eval_a[0].pop("detections"), eval_b[0].pop("detections")
    eval_a[0].pop("time"), eval_b[0].pop("time")                  # the wall clock of each run
    assert eval_a == eval_b
    assert eval_a[0]["images_scored"] == 100
    assert count_a > 1000 and abs(count_a - count_b) <= 1e-3 * count_a, (count_a, count_b)


def test_disjoint_slices_and_only_process_zero_writes(two_processes):
    log0, log1 = two_processes.text(0), two_processes.text(1)
    assert "2 processes read disjoint slices of 2 rows covering the global batch of 4 (checked)" in log0
    assert "eval step 4" in log0 and "done: 4 steps" in log0
    for line in ("eval step", "done:", "model ns", "data:"):
        assert line not in log1, (line, log1[-3000:])
    records = _records(two_processes.workdir)
    keys = [(r["kind"], r["step"]) for r in records]
    assert len(keys) == len(set(keys)), "a record was written twice (by both processes)"
    assert sorted(k for k in keys if k[0] == "train") == [("train", s) for s in range(1, STEPS + 1)]
    assert len(list((two_processes.workdir / "tensorboard").iterdir())) == 1
    for name in ("curves.png", "predictions.png"):
        assert (two_processes.workdir / name).is_file()


@pytest.fixture(scope="module")
def killed(shared, two_processes):
    """A 2-process run (started with the CLI flags) whose process 1 stops before step 3 and is
    killed once the step-2 checkpoint is complete, while process 0 runs into step 3 (after the first
    2-process run, whose compiled update step process 1 loads from its own cache); returns the job,
    process 0's exit code and the seconds it took to exit after the kill."""
    from damo_jax.train.checkpoint import Checkpoints
    job = Job(shared, shared / "killed", 2, env_per_process={1: {"DAMO_JAX_TEST_HANG_AT_STEP": "3"}}, flags=True)
    job.wait_for(1, "[test hook] hanging before step 3")
    ckpts = Checkpoints(job.workdir / "checkpoints", read_only=True)
    deadline = time.monotonic() + 120
    while not ckpts.is_complete(2) and time.monotonic() < deadline:   # async save of step 2
        time.sleep(0.5)
    if not ckpts.is_complete(2):
        job.kill()
        pytest.fail(f"the step-2 checkpoint was not complete within 120 s\n{job.dump()}")
    job.kill(1)
    t0 = time.monotonic()
    try:
        code = job.procs[0].wait(timeout=DEATH_BOUND)
    except subprocess.TimeoutExpired:
        job.kill()
        pytest.fail(f"process 0 still running {DEATH_BOUND} s after process 1 died\n{job.dump()}")
    return job, code, time.monotonic() - t0


def test_a_dead_process_stops_the_other_with_an_error(killed):
    job, code, took = killed
    print(f"process 0 exited with {code} {took:.1f} s after process 1 was killed")
    assert code != 0
    err = job.text(0)
    assert "[test hook]" not in job.text(0, "out"), "process 0 was meant to run into step 3"
    # the coordination service names the dead task; or a failed collective raised in Python and
    # distributed.exit_on_error reported it
    assert any(m in err for m in ("another task died", "stopped sending heartbeats", "error: process 0/2")), \
        err[-3000:]


def test_resume_after_killing_both_processes_is_exact(shared, two_processes, killed):
    job = killed[0]
    resumed = _finish(Job(shared, shared / "killed", 2, logs="resumed.logs"))
    assert "resumed from" in resumed.text(0) and "/checkpoints/2 " in resumed.text(0), resumed.dump()
    # process 1 compiled the update step once (in the first 2-process run) and loaded it from its
    # own executable cache in both later runs (JAX's persistent cache serves process 0 only)
    for run in (job, resumed):
        assert "process 1: loaded the compiled update step from" in run.text(1), run.dump()
    assert "loaded the compiled update step" not in two_processes.text(1)
    a, b = _state(two_processes.workdir), _state(resumed.workdir)
    for (path, x), (_, y) in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def test_processes_started_with_other_settings_are_refused_in_each(shared):
    """A process started with another learning rate trained its own model copy silently (the
    audit: exit 0, a wrong checkpoint); another batch size crashed both in gloo (C++ abort), another
    seed ended in a traceback. Now every process compares the run's config before any work and
    each prints one error line naming the keys that differ, exit 2, nothing written."""
    workdir = shared / "mismatch"
    job = Job(shared, workdir, 2, args_per_process={
        1: ["--config.train.base_lr_per_img=0.001", "--config.train.batch_size=8"]})
    codes = job.wait(timeout=300)
    assert codes == [2, 2], f"exit codes {codes}\n{job.dump()}"
    for i in (0, 1):
        err = job.text(i)
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in err, job.dump()
        assert ("process 1: train.base_lr_per_img = 0.001 (process 0: 0.000625), "
                "train.batch_size = 8 (process 0: 4)") in errors[0], errors[0]
    assert not (workdir / "checkpoints").exists() and not (workdir / "metrics.jsonl").exists()


def test_ctrl_c_on_every_process_is_one_line_and_exit_130(shared, two_processes):
    """Ctrl-C in a terminal reaches every process of a localhost run: each printed a traceback
    and 'error: process i/2: Interrupted: 2', exit 1 (the audit). Now each prints the one
    documented line and exits 130, and the same command resumes."""
    from damo_jax.train.checkpoint import Checkpoints
    job = Job(shared, shared / "ctrl_c", 2, logs="ctrl_c.logs",
              env_per_process={i: {"DAMO_JAX_TEST_HANG_AT_STEP": "3"} for i in (0, 1)})
    for i in (0, 1):
        job.wait_for(i, "[test hook] hanging before step 3")
    ckpts = Checkpoints(job.workdir / "checkpoints", read_only=True)
    deadline = time.monotonic() + 120
    while not ckpts.is_complete(2) and time.monotonic() < deadline:
        time.sleep(0.5)
    for p in job.procs:
        p.send_signal(signal.SIGINT)
    codes = job.wait(timeout=120)
    assert codes == [130, 130], f"exit codes {codes}\n{job.dump()}"
    for i in (0, 1):
        err = job.text(i)
        assert "Traceback" not in err and "error:" not in err, job.dump()
        assert f"interrupted (SIGINT) in process {i}/2: exiting so the other processes stop; the same " \
               f"command on every process resumes from the latest complete checkpoint" in err, job.dump()


def test_a_process_whose_peers_never_join_is_one_error_line(shared):
    """Only process 0 of 2 is started: it ended after DAMO_JAX_INIT_TIMEOUT_S in a C++ abort that
    blamed 'another task died' (exit 134, the audit). Now one error line says who did not join
    where, exit 2."""
    job = Job(shared, shared / "alone", 1, logs="alone.logs",
              env_per_process={0: {"DAMO_JAX_INIT_TIMEOUT_S": "6"}},
              args_per_process={0: ["--coordinator", f"127.0.0.1:{_free_port()}", "--num-processes", "2",
                                    "--process-id", "0"]})
    codes = job.wait(timeout=120)
    err = job.text(0)
    assert codes == [2], f"exit codes {codes}\n{job.dump()}"
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert "process 0/2: not every process joined 127.0.0.1:" in errors[0] and "within 6 s" in errors[0]



def _one_error_line(job: Job, i: int) -> str:
    err = job.text(i)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, job.dump()
    print(f"process {i}: {errors[0]}")
    return errors[0]


def test_processes_that_do_not_share_the_workdir_are_refused_in_each(shared):
    """Processes whose --workdir is not one shared folder (here: another path for process 1, as
    the same path on disks the hosts do not share) trained and evaluated, then froze at the first
    checkpoint: after 20 minutes both exited 1 with a traceback blaming disk space (the audit).
    Now process 0 writes a file with a random token into its run folder at start-up, the others
    must read it back: each process prints one error line naming its workdir, exit 2, in seconds,
    nothing trained, and the file is removed."""
    workdir, other = shared / "not_shared", shared / "not_shared_p1"
    other.mkdir()
    (other / f"{SHARED_MARKER_PREFIX}{'0' * 32}").write_text("0" * 32)   # stale: never matches
    t0 = time.monotonic()
    job = Job(shared, workdir, 2, logs="not_shared.logs", args_per_process={1: ["--workdir", str(other)]})
    codes = job.wait(timeout=300)
    took = time.monotonic() - t0
    print(f"refused after {took:.1f} s (start-up included)")
    assert codes == [2, 2], f"exit codes {codes}\n{job.dump()}"
    for i, folder in ((0, workdir), (1, other)):
        line = _one_error_line(job, i)
        assert f"--workdir {folder}: process 1 does not see the file process 0 wrote" in line, line
        assert "must share ONE run folder" in line and "shared file system" in line, line
        assert not (folder / "checkpoints").exists() and not (folder / "metrics.jsonl").exists()
    assert not list(workdir.glob(f"{SHARED_MARKER_PREFIX}*")), "process 0 left its marker behind"
    assert "first step" not in job.text(0)


def test_a_user_error_found_after_the_distributed_start_is_one_line_and_exit_2(shared):
    """A mistake that shows only once the processes have joined (the global batch of 6 does not
    split over the 4 devices of the 2 processes) printed a traceback and exit 1 in every process
    (the audit); a single process prints one line, exit 2. Now each process prints one error line,
    exit 2. The workdir check passed first (one shared folder) and left no file behind."""
    workdir = shared / "odd_batch"
    job = Job(shared, workdir, 2, logs="odd_batch.logs",
              args_per_process={i: ["--config.train.batch_size=6"] for i in (0, 1)})
    codes = job.wait(timeout=300)
    assert codes == [2, 2], f"exit codes {codes}\n{job.dump()}"
    for i in (0, 1):
        line = _one_error_line(job, i)
        assert line.startswith(f"error: process {i}/2: config train.batch_size=6 is not divisible by the "
                               f"4 devices"), line
    assert not list(workdir.glob(f"{SHARED_MARKER_PREFIX}*"))
    assert not (workdir / "checkpoints").exists() and not (workdir / "metrics.jsonl").exists()
