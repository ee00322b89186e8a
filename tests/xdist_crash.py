"""A ``--dist loadfile`` scheduler that survives a crashed pytest-xdist worker.

The suite runs under ``-n 2 --dist loadfile`` (pyproject.toml). In pytest-xdist 3.8.0, when a
worker dies (a segfault, ``os._exit``, the OOM killer), ``LoadScopeScheduling`` mishandles what the
dead worker held, and the run hangs until CI's time limit instead of ending red with the test named:

* ``remove_node`` puts the dead worker's *whole* workload back on the queue, the files it had
  finished included; a finished file later goes out as an empty batch (``send_runtest_some([])``),
  for which no completion ever comes, so the scheduler never hands that worker work again
  (pytest-xdist issues #1323 and #1378, PRs #1324 / #1363);
* the test the worker died in stays pending and is run again in the replacement worker, which it
  may take down too (PR #1371); the crash is already reported as that test's failure;
* a replacement worker is given one file; when that file has one test left, the worker waits for
  a second test (it runs each test once it knows the next one) that never comes (issue #1327).

Seen in this project's own CI: a worker died of SIGSEGV and the run then sat idle, with the
controller in ``dsession.loop_once`` and both live workers in ``remote.get`` (docs/bench_train.md
and README's CI paragraph). ``tests/conftest.py`` installs this scheduler for ``--dist loadfile``
(:func:`make_scheduler`) and, for a crashed worker, a log line saying how its process ended
(:func:`report_node_down`: "killed by SIGSEGV", "exit status 3"; xdist says only "Not properly
terminated"). ``tests/test_xdist_crash.py`` runs crashing suites through both. Nothing here
changes what a run without a crash does.
"""
from __future__ import annotations

from xdist.scheduler import LoadFileScheduling


class CrashSafeLoadFileScheduling(LoadFileScheduling):
    """``LoadFileScheduling`` whose crash recovery neither hangs nor repeats the crash."""

    def __init__(self, config, log=None):
        super().__init__(config, log)
        # {node: files recorded as assigned to it whose sending failed}: the nodes whose channel
        # closed when work was sent (dead, not yet removed)
        self._unsent: dict = {}

    def remove_node(self, node):
        """Forget ``node``; if it crashed, requeue its unfinished tests and return the crashed one.

        The crashed test (the first unfinished test of the node's workload, as upstream) is marked
        done: DSession reports it as failed ("worker 'gwN' crashed while running ..."). Files whose
        tests all ran stay done."""
        workload = self.assigned_work.pop(node)
        unsent = self._unsent.pop(node, set())         # files it never received: no crash there
        crashitem = None
        for scope, unit in workload.items():
            if scope in unsent:
                continue
            for nodeid, completed in unit.items():
                if not completed:
                    crashitem = nodeid
                    break
            if crashitem is not None:
                unit[crashitem] = True
                break
        if crashitem is None and not unsent:
            return None
        # The dead worker's unfinished files go to the front of the queue, in their order.
        unfinished = [(scope, unit) for scope, unit in workload.items() if not all(unit.values())]
        for scope, unit in reversed(unfinished):
            self.workqueue[scope] = unit
            self.workqueue.move_to_end(scope, last=False)
        for other in self.assigned_work:
            self._reschedule(other)
        return crashitem

    def mark_test_complete(self, node, item_index, duration=0):
        """As upstream; a late report of a node already removed (gone down) changes nothing."""
        if node not in self.assigned_work:
            return
        super().mark_test_complete(node, item_index, duration)

    def _assign_work_unit(self, node) -> None:
        """As upstream, but a file with nothing left to run is dropped, never sent empty; and a
        worker whose channel has closed (it died after reporting its last test, before DSession
        saw it go down) keeps the file as assigned instead of raising into DSession's loop
        (an INTERNALERROR that ended a CI run): ``remove_node`` requeues it when the node-down
        event arrives."""
        while self.workqueue:
            scope, unit = next(iter(self.workqueue.items()))
            if any(not done for done in unit.values()):
                try:
                    super()._assign_work_unit(node)
                except OSError:                     # execnet: "cannot send (already closed?)"
                    self._unsent.setdefault(node, set()).add(scope)
                return
            self.workqueue.popitem(last=False)

    def _reschedule(self, node) -> None:
        """Top ``node`` up to more than two pending tests while files are queued, then shut it down
        once the queue is empty (a worker holding one test waits for a next one or a shutdown)."""
        if node.shutting_down or node in self._unsent or node not in self.registered_collections:
            return          # a replacement worker still collecting: its own collectionfinish schedules it
        while self.workqueue and self._pending_of(self.assigned_work[node]) <= 2:
            self._assign_work_unit(node)
            if node in self._unsent:
                return
        if not self.workqueue:
            node.shutdown()                         # xdist ignores a closed channel here itself


def worker_exit_status(node, timeout: float = 10.0) -> str:
    """How a crashed worker's process ended, e.g. ``"killed by SIGSEGV"`` or ``"exit status 3"``
    (pytest-xdist itself says only "Not properly terminated"); ``"unknown"`` when the process is
    not a local child or has not ended within ``timeout`` seconds."""
    import signal
    import subprocess
    popen = getattr(getattr(node.gateway, "_io", None), "popen", None)
    if popen is None:
        return "unknown"
    try:
        code = popen.wait(timeout=timeout)
    except (subprocess.TimeoutExpired, OSError):
        return "unknown"
    if code is None:
        return "unknown"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def make_scheduler(config, log):
    """``pytest_xdist_make_scheduler``: this scheduler for ``--dist loadfile``, else xdist's own."""
    if config.getvalue("dist") != "loadfile":
        return None
    return CrashSafeLoadFileScheduling(config, log)


def report_node_down(node, error) -> None:
    """``pytest_testnodedown``: for a crashed worker, one log line saying how its process ended."""
    if error is None:
        return
    reporter = node.config.pluginmanager.getplugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"[{node.gateway.id}] worker process {worker_exit_status(node)}")
