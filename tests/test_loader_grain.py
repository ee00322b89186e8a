"""``TrainLoader(backend="grain")`` (grain worker processes, shared-memory transfer) yields exactly
the batches of the in-process loader, for a process slice of the global batch and when started
mid-run (resume), across the mosaic -> no-augmentation switch."""
from __future__ import annotations

import numpy as np
import pytest

from damo_jax.data_pipelines import TrainLoader
from data_helpers import make_coco_dataset


def _loader(ds, **kw):
    cfg = {"image_size": (64, 64), "mosaic_size": (64, 64), "max_boxes": 8}
    return TrainLoader(ds, cfg, batch_size=4, seed=3, steps_per_epoch=3, total_steps=6, no_aug_start_step=5,
                       start_step=3, process_index=1, process_count=2, **kw)


def test_grain_backend_yields_the_in_process_batches(tmp_path):
    pytest.importorskip("grain")
    ds, _ = make_coco_dataset(tmp_path, n=6)
    with _loader(ds, workers=0) as ref_loader:
        ref = list(ref_loader)
    with _loader(ds, workers=1, backend="grain") as loader:
        got = list(loader)
        assert loader.state() == {"step": 6}
    assert len(ref) == len(got) == 3
    for a, b in zip(ref, got):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(np.asarray(b[k]), a[k], err_msg=k)


def test_unknown_backend_is_refused(tmp_path):
    with pytest.raises(ValueError, match="not 'process' or 'grain'"):
        _loader(make_coco_dataset(tmp_path, n=2)[0], backend="threads")


def test_a_loader_closed_early_leaks_no_shared_memory(tmp_path):
    """A run that stops before the loader's last step (train.max_steps, Ctrl-C) closes the loader
    with batches still prefetched in shared memory; they used to stay there until Python's
    resource tracker warned "There appear to be N leaked shared_memory objects" at exit."""
    pytest.importorskip("grain")
    import subprocess
    import sys
    from pathlib import Path
    script = tmp_path / "early.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from pathlib import Path\n"
        "from data_helpers import make_coco_dataset\n"
        "from damo_jax.data_pipelines import TrainLoader\n"
        "if __name__ == '__main__':\n"
        f"    ds, _ = make_coco_dataset(Path({str(tmp_path)!r}), n=6)\n"
        "    cfg = {'image_size': (64, 64), 'mosaic_size': (64, 64), 'max_boxes': 8}\n"
        "    with TrainLoader(ds, cfg, batch_size=4, seed=3, steps_per_epoch=3, total_steps=30,\n"
        "                     no_aug_start_step=25, workers=2, backend='grain') as loader:\n"
        "        for _ in range(2):\n"
        "            next(iter(loader))\n"
        "    print('closed', flush=True)\n")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "closed" in r.stdout, r.stderr[-3000:]
    assert "leaked shared_memory" not in r.stderr, r.stderr[-3000:]
