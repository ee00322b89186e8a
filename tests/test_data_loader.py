"""TrainLoader (determinism, resume, multi-process slicing, workers, shutdown) and eval_batches."""
from __future__ import annotations

import logging
import os

import numpy as np
import pytest

from data_helpers import make_coco_dataset
from damo_jax.data_pipelines import TrainLoader, eval_batches, global_indices
from damo_jax.data_pipelines.batching import pad_targets

CFG = {"image_size": (64, 64), "mosaic_size": (64, 64), "max_boxes": 8, "mixup_prob": 0.5, "prefetch": 1}


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    dataset, _ = make_coco_dataset(tmp_path_factory.mktemp("coco"), n=7, size=(48, 64))
    return dataset


def _loader(ds, **kw):
    args = dict(batch_size=4, seed=3, steps_per_epoch=2, total_steps=6, no_aug_start_step=4, workers=0)
    args.update(kw)
    return TrainLoader(ds, CFG, **args)


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_batch_layout_and_dtypes(ds):
    batch = next(iter(_loader(ds)))
    assert batch["images"].shape == (4, 64, 64, 3) and batch["images"].dtype == np.uint8
    assert batch["gt_boxes"].shape == (4, 8, 4) and batch["gt_boxes"].dtype == np.float32
    assert batch["gt_labels"].shape == (4, 8) and batch["gt_labels"].dtype == np.int32
    assert batch["gt_valid"].dtype == bool and batch["image_ids"].dtype == np.int64
    assert batch["orig_sizes"].shape == (4, 2) and (batch["orig_sizes"] == (48, 64)).all()
    assert (batch["gt_boxes"][~batch["gt_valid"]] == 0).all()
    valid_boxes = batch["gt_boxes"][batch["gt_valid"]]
    assert (valid_boxes[:, 2] > valid_boxes[:, 0]).all() and valid_boxes.max() <= 64


def test_batches_depend_only_on_seed_and_step_and_resume(ds):
    full = list(_loader(ds))
    assert len(full) == 6
    resumed = _loader(ds, start_step=3)
    assert resumed.state() == {"step": 3}
    for k, batch in zip(range(3, 6), resumed):
        _same(batch, full[k])
    assert resumed.state() == {"step": 6}
    other = next(iter(_loader(ds, seed=4)))
    assert not np.array_equal(other["images"], full[0]["images"])
    # an epoch visits a permutation of the dataset (positions wrap modulo its length)
    idx = np.concatenate([global_indices(3, s, 4, 2, len(ds)) for s in range(2)])
    assert sorted(idx[:7].tolist()) == list(range(7))


def test_process_slices_make_up_the_global_batch(ds):
    glob = list(_loader(ds, total_steps=2))
    parts = [list(_loader(ds, total_steps=2, process_index=p, process_count=2)) for p in range(2)]
    for k in range(2):
        for key in glob[k]:
            np.testing.assert_array_equal(np.concatenate([parts[0][k][key], parts[1][k][key]]), glob[k][key])
    with pytest.raises(ValueError, match="divisible"):
        _loader(ds, process_count=3)


def test_no_aug_tail_is_resize_flip_only(ds):
    cfg = dict(CFG, sada=False)
    loader = TrainLoader(ds, cfg, batch_size=4, seed=0, steps_per_epoch=2, total_steps=2,
                         no_aug_start_step=0, workers=0)
    batch = next(loader)
    for img, iid in zip(batch["images"], batch["image_ids"]):
        import cv2
        original = cv2.resize(ds[int(iid) - 1]["image"], (64, 64), interpolation=cv2.INTER_LINEAR)
        assert np.array_equal(img, original) or np.array_equal(img, original[:, ::-1])


def test_pad_targets_keeps_the_largest_and_loader_warns_once(ds, caplog):
    boxes = np.array([[0, 0, 1, 1], [0, 0, 5, 5], [0, 0, 3, 3], [0, 0, 4, 4]], np.float32)
    b, l, v, dropped = pad_targets(boxes, np.arange(4), 2)
    assert dropped == 2 and v.tolist() == [True, True]
    np.testing.assert_array_equal(l, [1, 3])  # largest two, original order
    cfg = dict(CFG, max_boxes=1)
    with caplog.at_level(logging.WARNING, logger="data_pipelines"):
        loader = TrainLoader(ds, cfg, batch_size=4, seed=0, steps_per_epoch=2, total_steps=3,
                             no_aug_start_step=3, workers=0)
        list(loader)
    assert loader.stats["truncated_boxes"] > 0
    assert caplog.text.count("more than max_boxes") == 1


def test_workers_give_identical_batches_and_shut_down(ds):
    ref = list(_loader(ds, total_steps=3))
    with _loader(ds, total_steps=3, workers=2) as loader:
        got = list(loader)
        pool = loader._pool
        assert pool is not None
    assert loader._pool is None
    for a, b in zip(ref, got):
        _same(a, b)


class _DyingDataset:
    """A dataset whose worker process exits abruptly (picklable: module-level class)."""

    def __init__(self, inner):
        self.inner = inner
        self.indices_with_boxes = inner.indices_with_boxes

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        os._exit(3)  # only ever called inside the worker process


def test_dead_worker_raises_instead_of_hanging(ds):
    loader = _loader(_DyingDataset(ds), workers=1)
    with pytest.raises(RuntimeError, match="worker process died while building step 0"):
        next(loader)
    loader.close()


def test_eval_batches_pad_the_last_batch(ds):
    batches = list(eval_batches(ds, 32, 3, workers=2))
    assert len(batches) == 3 and [b["valid"].sum() for b in batches] == [3, 3, 1]
    last = batches[-1]
    assert last["images"].shape == (3, 32, 32, 3) and (last["images"][1:] == 0).all()
    assert last["image_ids"].tolist() == [7, -1, -1] and last["orig_sizes"][0].tolist() == [48, 64]
    ids = np.concatenate([b["image_ids"][b["valid"]] for b in batches])
    assert ids.tolist() == list(range(1, 8))
    import cv2
    np.testing.assert_array_equal(batches[0]["images"][1], cv2.resize(ds[1]["image"], (32, 32)))


def test_all_negative_and_all_broken_datasets_never_hang(tmp_path):
    from data_helpers import write_coco
    from damo_jax.data_pipelines import DataError, open_dataset
    empty = [(np.full((24, 24, 3), 90, np.uint8), np.zeros((0, 4)), np.zeros((0,), int)) for _ in range(3)]
    write_coco(tmp_path / "neg", empty)
    neg = open_dataset(f"coco:{tmp_path / 'neg'}")
    cfg = dict(CFG, mixup_prob=1.0)
    batches = list(TrainLoader(neg, cfg, batch_size=2, seed=0, steps_per_epoch=2, total_steps=2,
                               no_aug_start_step=2, workers=0))
    assert len(batches) == 2 and not batches[0]["gt_valid"].any()
    write_coco(tmp_path / "bad", empty)
    for f in (tmp_path / "bad" / "train2017").iterdir():
        f.write_bytes(b"not an image")
    bad = open_dataset(f"coco:{tmp_path / 'bad'}")
    with pytest.raises(DataError, match="unreadable samples in a row"):
        next(TrainLoader(bad, cfg, batch_size=2, seed=0, steps_per_epoch=2, total_steps=2,
                         no_aug_start_step=2, workers=0))
