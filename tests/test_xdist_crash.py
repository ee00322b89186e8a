"""End to end: a suite whose workers crash still ends, under the suite's own ``-n 2 --dist loadfile``.

Each case writes a small suite into ``tmp_path`` whose tests kill their pytest-xdist worker
(``os._exit``, or a real SIGSEGV through ``ctypes``), runs it in a child ``pytest`` with the
scheduler that ``tests/conftest.py`` installs (tests/xdist_crash.py), and checks what a CI log must
show: the run ends (stock pytest-xdist 3.8.0 hangs in these cases until it is killed), each crash is
reported once as the failure of the test that crashed, and every other test runs once.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("xdist")

TESTS = Path(__file__).resolve().parent

CONFTEST = f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
from xdist_crash import make_scheduler, report_node_down

def pytest_xdist_make_scheduler(config, log):
    return make_scheduler(config, log)

def pytest_testnodedown(node, error):
    report_node_down(node, error)
"""


def _run_suite(tmp_path: Path, files: dict[str, str], timeout: float = 120.0,
               options: tuple[str, ...] = ()) -> tuple[int, str]:
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "conftest.py").write_text(CONFTEST)
    for name, body in files.items():
        (tmp_path / name).write_text(textwrap.dedent(body))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTEST_", "COV_CORE"))}
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider",
             "-n", "2", "--dist", "loadfile", *options],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        pytest.fail(f"the crashing suite hung (killed after {timeout:.0f} s); output:\n{out[-3000:]}")
    return proc.returncode, proc.stdout + proc.stderr


def _why(out: str) -> str:
    """What to show when a crashing suite ended otherwise than expected: pytest's own internal
    errors first (a worker's faulthandler dump at the end of stderr would hide them), then the tail."""
    internal = [line for line in out.splitlines() if "INTERNALERROR" in line]
    return "\n".join(internal[-40:]) + "\n...\n" + out[-2000:]


def _outcomes(out: str) -> dict[str, list[str]]:
    """test id -> the outcomes -rA reports for it, in order."""
    seen: dict[str, list[str]] = {}
    for m in re.finditer(r"^(PASSED|FAILED|ERROR) (\S+\.py::\w+)", out, re.M):
        seen.setdefault(m.group(2), []).append(m.group(1))
    return seen


QUICK = """
    def test_1(): pass
    def test_2(): pass
    def test_3(): pass
"""


def test_a_crash_mid_file_is_reported_once_and_the_rest_runs(tmp_path):
    rc, out = _run_suite(tmp_path, {
        "test_a.py": QUICK,
        "test_b.py": """
            import os, time
            def test_before(): time.sleep(0.3)
            def test_crash(): os._exit(3)
            def test_after_1(): pass
            def test_after_2(): pass
        """,
        "test_c.py": QUICK,
        "test_d.py": "def test_only(): pass\n",
    })
    seen = _outcomes(out)
    assert rc == 1, _why(out)
    assert seen.pop("test_b.py::test_crash") == ["FAILED"], out[-3000:]
    assert "crashed while running 'test_b.py::test_crash'" in out
    assert "worker process exit status 3" in out
    expected = {f"test_{f}.py::test_{i}" for f in "ac" for i in (1, 2, 3)}
    expected |= {"test_b.py::test_before", "test_b.py::test_after_1", "test_b.py::test_after_2",
                 "test_d.py::test_only"}
    assert seen == {t: ["PASSED"] for t in expected}, out[-3000:]


def test_a_segfault_in_the_last_test_of_a_file_and_one_in_the_second_last(tmp_path):
    rc, out = _run_suite(tmp_path, {
        "test_a.py": """
            import ctypes, time
            def test_1(): time.sleep(0.2)
            def test_segv(): ctypes.string_at(0)
        """,
        "test_b.py": """
            import os
            def test_1(): pass
            def test_exit(): os._exit(1)
            def test_last(): pass
        """,
        "test_c.py": QUICK,
        "test_d.py": QUICK,
        "test_e.py": "def test_only(): pass\n",
    })
    seen = _outcomes(out)
    assert rc == 1, _why(out)
    assert seen.pop("test_a.py::test_segv") == ["FAILED"], out[-3000:]
    assert seen.pop("test_b.py::test_exit") == ["FAILED"], out[-3000:]
    assert "worker process killed by SIGSEGV" in out and "worker process exit status 1" in out
    expected = {f"test_{f}.py::test_{i}" for f in "cd" for i in (1, 2, 3)}
    expected |= {"test_a.py::test_1", "test_b.py::test_1", "test_b.py::test_last",
                 "test_e.py::test_only"}
    assert seen == {t: ["PASSED"] for t in expected}, out[-3000:]


def test_without_a_crash_every_test_runs_once(tmp_path):
    rc, out = _run_suite(tmp_path, {f"test_{f}.py": QUICK for f in "abcde"})
    assert rc == 0, out[-3000:]
    assert _outcomes(out) == {f"test_{f}.py::test_{i}": ["PASSED"]
                              for f in "abcde" for i in (1, 2, 3)}


def test_a_hung_test_is_stopped_by_the_suite_timeout_and_the_rest_runs(tmp_path):
    """pyproject.toml's ``faulthandler_timeout`` / ``faulthandler_exit_on_timeout``: a test that
    never returns ends its worker with every thread's stack in the log; the run goes on, ends red."""
    rc, out = _run_suite(tmp_path, {
        "test_a.py": QUICK,
        "test_b.py": """
            import threading
            def test_1(): pass
            def test_hangs(): threading.Event().wait()
            def test_after(): pass
        """,
        "test_c.py": QUICK,
    }, options=("-o", "faulthandler_timeout=3", "-o", "faulthandler_exit_on_timeout=true"))
    seen = _outcomes(out)
    assert rc == 1, _why(out)
    assert seen.pop("test_b.py::test_hangs") == ["FAILED"], out[-3000:]
    assert "Timeout (0:00:03)!" in out and 'in test_hangs' in out    # faulthandler's stack dump
    expected = {f"test_{f}.py::test_{i}" for f in "ac" for i in (1, 2, 3)}
    expected |= {"test_b.py::test_1", "test_b.py::test_after"}
    assert seen == {t: ["PASSED"] for t in expected}, out[-3000:]


class _Config:
    """What the scheduler reads of pytest's config: two workers, files in collection order."""
    option = type("Option", (), {"loadscopereorder": False})()

    def getvalue(self, name):
        return {"tx": ["2*popen"], "dist": "loadfile"}.get(name)


class _Node:
    """A worker as the scheduler sees it; ``closed``: its channel is gone (sending raises, as
    execnet does)."""

    def __init__(self, name):
        self.closed, self.shutting_down, self.sent = False, False, []
        self.gateway = type("Gateway", (), {"id": name})()

    def send_runtest_some(self, indexes):
        if self.closed:
            raise OSError("cannot send (already closed?)")
        self.sent.append(indexes)

    def shutdown(self):
        self.shutting_down = True


IDS = [f"test_{f}.py::test_{i}" for f in "abcdef" for i in (1, 2)]


def _scheduled():
    """(scheduler, [gw0, gw1]) after the initial distribution of 6 files of 2 tests (``IDS``)."""
    from xdist_crash import CrashSafeLoadFileScheduling
    sched = CrashSafeLoadFileScheduling(_Config())
    nodes = [_Node("gw0"), _Node("gw1")]
    for node in nodes:
        sched.add_node(node)
        sched.add_node_collection(node, IDS)
    sched.schedule()
    return sched, nodes


def test_work_sent_to_a_worker_whose_channel_just_closed_is_requeued_not_an_internal_error():
    """The race a CI run hit: a worker reports a test and dies at once; DSession handles the
    report first, the scheduler tops the worker up, and execnet raises "cannot send (already
    closed?)" into DSession's loop (INTERNALERROR, the run ended red for nothing). Now the file
    stays recorded for that worker and, when its node-down event comes, is requeued whole (its
    tests never ran there, so none is blamed for the crash)."""
    sched, (dying, alive) = _scheduled()               # two files (4 tests) each, two queued
    first, second = list(sched.assigned_work[dying])
    assert len(sched.workqueue) == 2
    sched.mark_test_complete(dying, IDS.index(f"{first}::test_1"))
    dying.closed = True                                # it reports its next test, then is gone
    sched.mark_test_complete(dying, IDS.index(f"{first}::test_2"))    # top-up: the send fails
    for t in (1, 2):
        sched.mark_test_complete(dying, IDS.index(f"{second}::test_{t}"))
    crashed = sched.remove_node(dying)                 # the node-down event
    assert crashed is None                             # all it received ran; the unsent file is no crash
    done = {f"{f}::test_{t}" for f in (first, second) for t in (1, 2)}
    queued = [t for unit in sched.assigned_work[alive].values() for t, ok in unit.items() if not ok] + \
        [t for unit in sched.workqueue.values() for t in unit]
    assert sorted(queued) == sorted(set(IDS) - done)   # every test not run yet runs once, on gw1


def test_a_replacement_worker_still_collecting_is_not_given_work():
    """Both workers of a run crash; two replacements start. The first to finish collecting calls
    schedule(), which topped up every node, the other replacement too, whose collection was not
    registered yet: KeyError into DSession (INTERNALERROR, reproduced once in 20 crash suites
    under load). A node is now given work only once its collection is known."""
    sched, (gw0, gw1) = _scheduled()
    for node in (gw0, gw1):                        # both die in their first test
        sched.remove_node(node)
    gw2, gw3 = _Node("gw2"), _Node("gw3")
    sched.add_node(gw2)
    sched.add_node(gw3)
    sched.add_node_collection(gw3, IDS)            # gw3 has collected, gw2 not yet
    sched.schedule()                               # DSession.worker_collectionfinish(gw3)
    assert gw3.sent and not gw2.sent
    sched.add_node_collection(gw2, IDS)
    sched.schedule()                               # DSession.worker_collectionfinish(gw2)
    assert gw2.sent or not sched.workqueue
