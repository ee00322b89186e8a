"""Fuzz the readers with malformed annotation files: nothing may escape except DataError."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from damo_jax.data_pipelines import DataError
from damo_jax.data_pipelines.readers.coco import read_coco
from damo_jax.data_pipelines.readers.voc import read_voc
from damo_jax.data_pipelines.readers.yolo import parse_label_file, read_yolo

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 300), st.integers(), st.floats(allow_nan=True),
                         st.text(max_size=6))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)

BASE_COCO = {
    "images": [{"id": 1, "file_name": "a.jpg", "width": 40, "height": 30},
               {"id": 2, "file_name": "b.jpg", "width": 20, "height": 20}],
    "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [1, 2, 10, 5], "iscrowd": 0,
                     "area": 12.5},
                    {"id": 2, "image_id": 2, "category_id": 5, "bbox": [15, 15, 10, 10]}],
    "categories": [{"id": 3, "name": "x"}, {"id": 5, "name": "y"}],
}


def _check_dataset(ds):
    for rec in ds.records:
        assert rec.boxes.dtype == np.float32 and rec.boxes.shape == (len(rec.labels), 4)
        if len(rec.boxes):
            assert (rec.boxes[:, 2] > rec.boxes[:, 0]).all() and (rec.boxes[:, 3] > rec.boxes[:, 1]).all()
            assert rec.boxes[:, 0::2].max() <= rec.width and rec.boxes[:, 1::2].max() <= rec.height
            assert ((rec.labels >= 0) & (rec.labels < ds.num_classes)).all()


@st.composite
def mutated_coco(draw):
    data = json.loads(json.dumps(BASE_COCO))
    for _ in range(draw(st.integers(1, 4))):
        section = draw(st.sampled_from(["images", "annotations", "categories", None]))
        if section is None:
            data[draw(st.sampled_from(list(BASE_COCO)))] = draw(json_values)
            continue
        items = data.get(section)
        if not isinstance(items, list) or not items:
            continue
        item = items[draw(st.integers(0, len(items) - 1))]
        if not isinstance(item, dict):
            continue
        key = draw(st.sampled_from(sorted(item) + ["extra"]))
        if draw(st.booleans()):
            item.pop(key, None)
        else:
            item[key] = draw(json_values)
    return data


@FUZZ
@given(mutated_coco())
def test_coco_reader_fuzz(data):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "instances.json"
        path.write_text(json.dumps(data))
        try:
            ds = read_coco(path, d)
        except DataError:
            return
        _check_dataset(ds)
        ds.to_coco_dict()


@FUZZ
@given(st.binary(max_size=60))
def test_coco_reader_garbage_bytes(raw):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "instances.json"
        path.write_bytes(raw)
        try:
            _check_dataset(read_coco(path, d))
        except DataError:
            pass


label_token = st.sampled_from(["0", "1", "2", "7", "-1", "0.5", "1.5", "-0.2", "1e3", "nan", "inf", "x", "", "0.0"])


@FUZZ
@given(st.lists(st.lists(label_token, max_size=9).map(" ".join), max_size=5).map("\n".join))
def test_yolo_label_file_fuzz(text):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "a.txt"
        path.write_text(text)
        try:
            boxes, labels = parse_label_file(path, 40, 30, {0: 0, 1: 1, 2: 2})
        except DataError:
            return
        assert len(boxes) == len(labels) and set(labels) <= {0, 1, 2}


@FUZZ
@given(json_values)
def test_yolo_yaml_fuzz(value):
    import yaml
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "images").mkdir()
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(Path(d) / "images" / "0.png")
        doc = value if not isinstance(value, dict) else {"train": "images", "names": ["a"], **value}
        (Path(d) / "data.yaml").write_text(yaml.safe_dump(doc))
        try:
            _check_dataset(read_yolo(Path(d) / "data.yaml", "train"))
        except DataError:
            pass


xml_field = st.one_of(st.sampled_from(["1", "0", "12.5", "-3", "", "abc", "1e9", "nan", "inf", "-1e999"]),
                      st.text(max_size=4))


@st.composite
def voc_xml(draw):
    if draw(st.integers(0, 5)) == 0:
        return draw(st.text(max_size=40))
    objs = []
    for _ in range(draw(st.integers(0, 3))):
        parts = [f"<name>{draw(st.sampled_from(['cat', 'dog', '', '&amp;']))}</name>"]
        if draw(st.booleans()):
            parts.append(f"<difficult>{draw(xml_field)}</difficult>")
        if draw(st.integers(0, 4)):
            coords = "".join(f"<{t}>{draw(xml_field)}</{t}>" for t in ("xmin", "ymin", "xmax", "ymax")
                             if draw(st.integers(0, 6)))
            parts.append(f"<bndbox>{coords}</bndbox>")
        objs.append("<object>" + "".join(parts) + "</object>")
    size = f"<size><width>{draw(xml_field)}</width><height>{draw(xml_field)}</height></size>"
    return f"<annotation>{size if draw(st.booleans()) else ''}{''.join(objs)}</annotation>"


@FUZZ
@given(voc_xml(), st.sampled_from([None, ["cat", "dog"]]))
def test_voc_reader_fuzz(xml, names):
    with tempfile.TemporaryDirectory() as d:
        Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(Path(d) / "im.png")
        (Path(d) / "im.xml").write_text(xml)
        try:
            _check_dataset(read_voc(d, "train", class_names=names))
        except DataError:
            pass
