"""TFDS reader, offline through ``tfds.testing.mock_data`` (random examples and hand-made ones)."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

tfds = pytest.importorskip("tensorflow_datasets", reason="tensorflow-datasets not installed (extra [tf])")

from damo_jax.data_pipelines import open_dataset  # noqa: E402
from damo_jax.data_pipelines.readers.tfds import COCO_CATEGORY_IDS  # noqa: E402


def test_random_mock_coco_is_handled_and_counted():
    with tfds.testing.mock_data(num_examples=5):
        ds = open_dataset("tfds:coco/2017", "train")
        assert len(ds) == 5 and ds.num_classes == 80 and ds.category_ids == COCO_CATEGORY_IDS
        # mock objects/* sequences have different lengths and inverted boxes: trimmed + counted
        assert ds.stats["inconsistent_objects"] > 0 and ds.stats["inverted_boxes"] > 0
        for i in range(len(ds)):
            s = ds[i]
            h, w = s["orig_size"]
            assert s["image"].shape == (h, w, 3) and s["image"].dtype == np.uint8
            b = s["boxes"]
            assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
            assert b.min(initial=0) >= 0 and (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
            assert ((s["labels"] >= 0) & (s["labels"] < 80)).all()


def _png(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


EXAMPLES = [
    {"image": np.full((40, 50, 3), 7, np.uint8), "image/id": np.int64(101), "image/filename": "a.jpg",
     "objects": {"bbox": np.array([[0.1, 0.2, 0.5, 0.6], [0.5, 0.5, 0.4, 0.9], [0.0, 0.0, 1.0, 0.5]], np.float32),
                 "label": np.array([3, 1, 0]), "is_crowd": np.array([False, False, True])}},
    {"image": _png(np.full((20, 30, 3), 200, np.uint8)), "image/id": np.int64(102), "image/filename": "b.jpg",
     "objects": {"bbox": np.zeros((0, 4), np.float32), "label": np.zeros((0,), np.int64),
                 "is_crowd": np.zeros((0,), bool)}},
]


def _fake_source(builder, split, decoders=None, **kwargs):
    return EXAMPLES


def test_hand_made_examples_convert_exactly():
    with tfds.testing.mock_data(as_data_source_fn=_fake_source):
        ds = open_dataset("tfds:coco/2017", "val")
        assert [r.image_id for r in ds.records] == [101, 102]
        s = ds[0]
        np.testing.assert_allclose(s["boxes"], [[10, 4, 30, 20]], atol=1e-4)  # [ymin,xmin,ymax,xmax]·(h,w)
        assert s["labels"].tolist() == [3] and ds.stats["inverted_boxes"] == 1 and ds.stats["crowd_boxes"] == 1
        assert s["image"].shape == (40, 50, 3) and (s["image"] == 7).all()
        neg = ds[1]  # encoded image bytes, no objects: a negative
        assert neg["image"].shape == (20, 30, 3) and (neg["image"] == 200).all() and len(neg["boxes"]) == 0
        gt = ds.to_coco_dict()
        cat = {a["iscrowd"]: a["category_id"] for a in gt["annotations"]}
        assert cat == {0: COCO_CATEGORY_IDS[3], 1: COCO_CATEGORY_IDS[0]}


def test_out_of_range_label_is_a_data_error():
    bad = [dict(EXAMPLES[0], objects=dict(EXAMPLES[0]["objects"], label=np.array([3, 1, 80])))]
    from damo_jax.data_pipelines import DataError
    with tfds.testing.mock_data(as_data_source_fn=lambda *a, **k: bad):
        with pytest.raises(DataError, match="objects/label.*80"):
            open_dataset("tfds:coco/2017", "train")


def test_unknown_tfds_dataset_is_a_data_error():
    from damo_jax.data_pipelines import DataError
    with pytest.raises(DataError, match="no_such_dataset_xyz"):
        open_dataset("tfds:no_such_dataset_xyz", "train")


def test_an_unprepared_dataset_is_named_as_such(tmp_path):
    """A known dataset not prepared in the data_dir quoted tfds's own text: "... is already prepared
    at <dir> in the FileFormat.TFRECORD format. Either choose another data_dir or delete the
    data." Now: not prepared, where it was looked for, and how to prepare it."""
    from damo_jax.data_pipelines import DataError
    from damo_jax.data_pipelines.readers.tfds import read_tfds
    with pytest.raises(DataError, match=r"^tfds:mnist: not prepared in .*mnist.*; random access "
                                        r"needs the dataset prepared offline") as info:
        read_tfds("mnist", "train", data_dir=str(tmp_path / "none"))
    assert "already prepared" not in str(info.value)


def test_an_unprepared_dataset_leaves_no_temp_folder(tmp_path, monkeypatch):
    """tfds.builder makes a tmp*tfds folder for a dataset it finds unprepared and never removes it
    (DatasetInfo.initialize_from_bucket with GCS disabled); opening must leave the temp dir as it was."""
    import tempfile
    from damo_jax.data_pipelines import DataError
    from damo_jax.data_pipelines.readers.tfds import read_tfds
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    with pytest.raises(DataError, match="not prepared"):
        read_tfds("mnist", "train", data_dir=str(tmp_path / "none"))
    assert sorted(p.name for p in temp.iterdir()) == []
    assert tempfile.tempdir == str(temp)
