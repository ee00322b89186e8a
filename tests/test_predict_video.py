"""``damo-jax predict --source VIDEO``: frames in RGB order, every frame detected, the drawn MP4.

The videos are written here with OpenCV's lossless FFV1 codec, so the decoded frames equal the
frames written, and the expected boxes are known per frame.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from damo_jax.inference.detector import Detector, JaxBackend
from damo_jax.inference.video import VideoReader, predict_video

from eval_fakes import CLASS_NAMES, ColorBoxOracle, draw_boxes, write_two_class_run

H, W, FPS = 90, 160, 12.5


def moving_red_box(k: int) -> list[int]:
    """Frame k's red box, x1y1x2y2 pixels: 30x20, moving right 9 px a frame."""
    x1, y1 = 5 + 9 * k, 10 + 4 * k
    return [x1, y1, x1 + 30, y1 + 20]


def frames_rgb(n: int) -> list[np.ndarray]:
    """n RGB frames: a red box that moves, a green box in the last frames only."""
    frames = []
    for k in range(n):
        boxes, labels = [moving_red_box(k)], [0]
        if k >= n - 2:
            boxes.append([120, 50, 150, 80])
            labels.append(1)
        frames.append(draw_boxes(H, W, boxes, labels))
    return frames


def write_video(path: Path, frames, fourcc: str = "FFV1", fps: float = FPS) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (W, H))
    assert writer.isOpened()
    for rgb in frames:
        writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def read_all(path: Path) -> list[np.ndarray]:
    cap, out = cv2.VideoCapture(str(path)), []
    while True:
        ok, frame = cap.read()
        if not ok:
            return out
        out.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))


@pytest.fixture(scope="module")
def oracle():
    model = ColorBoxOracle()
    variables = model.init(jax.random.key(0), jnp.zeros((1, 96, 160, 3)))
    return Detector(JaxBackend(model, variables), class_names=CLASS_NAMES, image_size=(96, 160),
                    conf=0.3, iou=0.7, max_dets=10, batch_size=3)


def test_reader_gives_the_written_frames_in_rgb(tmp_path):
    frames = frames_rgb(5)
    with VideoReader(write_video(tmp_path / "clip.avi", frames)) as reader:
        got = list(reader)
        assert (reader.width, reader.height, reader.fps, reader.frames_read) == (W, H, FPS, 5)
    assert len(got) == 5
    for a, b in zip(got, frames):
        np.testing.assert_array_equal(a, b)


def test_every_frame_is_detected_and_drawn(oracle, tmp_path):
    n = 7                                     # batch 3: two full batches and a padded one
    frames = frames_rgb(n)
    source = write_video(tmp_path / "clip.avi", frames)
    out = tmp_path / "out"
    out.mkdir()
    summary = predict_video(oracle, source, out)
    video = summary["video"]
    assert (video["width"], video["height"], video["fps"], video["frames"]) == (W, H, FPS, n)
    assert [f["frame"] for f in summary["frames"]] == list(range(n))
    assert [f["time_s"] for f in summary["frames"]] == [round(k / FPS, 4) for k in range(n)]
    for k, entry in enumerate(summary["frames"]):
        expected = {0: moving_red_box(k)}
        if k >= n - 2:
            expected[1] = [120, 50, 150, 80]
        assert sorted(entry["labels"]) == sorted(expected), (k, entry)
        for box, label, name in zip(entry["boxes"], entry["labels"], entry["class_names"]):
            assert name == CLASS_NAMES[label]
            # the oracle works at 96x160 on the stretched frame: boxes come back within a pixel
            np.testing.assert_allclose(box, expected[label], atol=1.0)
    # the Python API: Detector.video yields the frames (RGB) with the same detections
    via_api = list(oracle.video(source))
    assert len(via_api) == n
    for k, ((frame, result), entry) in enumerate(zip(via_api, summary["frames"])):
        np.testing.assert_array_equal(frame, frames[k])
        assert result["labels"].tolist() == entry["labels"]
        np.testing.assert_allclose(result["boxes"], entry["boxes"], atol=0.01)
    drawn = read_all(Path(video["drawing"]))
    assert Path(video["drawing"]) == out / "clip.mp4"
    assert len(drawn) == n and drawn[0].shape == (H, W, 3)
    assert not (out / "clip.partial.mp4").exists()
    cap = cv2.VideoCapture(video["drawing"])
    assert cap.get(cv2.CAP_PROP_FPS) == pytest.approx(FPS)
    # boxes are drawn: the outline around the red box has the class colour, not the background
    x1, y1, x2, y2 = moving_red_box(3)
    ring = np.concatenate([drawn[3][y1 - 1, x1:x2], drawn[3][y2, x1:x2]])
    assert np.abs(ring.astype(int) - 20).max() > 60


def test_bgr_frames_would_not_be_found(oracle, tmp_path):
    """The check above can fail: the oracle finds a red box only in RGB order (the official demo
    feeds OpenCV's BGR frames to the model, SPEC §10.2)."""
    bgr = [f[..., ::-1] for f in frames_rgb(3)]
    assert all(0 not in r["labels"] for r in oracle(bgr))


def test_cli_video_matches_the_same_frames_as_images(tmp_path, capsys, caplog):
    """The video path and the image path give the same detections for the same frames (ns with
    random weights, a low threshold: many boxes to compare)."""
    from damo_jax.cli.predict import main
    run_dir, _, _ = write_two_class_run(tmp_path)
    frames = frames_rgb(4)
    source = write_video(tmp_path / "clip.mkv", frames)
    images = tmp_path / "frames"
    images.mkdir()
    for k, frame in enumerate(frames):
        Image.fromarray(frame).save(images / f"{k}.png")
    common = ["--checkpoint", str(run_dir), "--conf", "0.001", "--batch-size", "2", "--no-progress"]
    summary = main(common + ["--source", str(source), "--out", str(tmp_path / "v"), "--save-txt"])
    printed = capsys.readouterr().out
    assert "video clip.mkv: 4 frame(s) at 12.5 fps" in printed and "clip.mp4" in printed
    assert json.loads((tmp_path / "v" / "detections.json").read_text()) == json.loads(
        json.dumps(summary))
    assert summary["image_size"] == [64, 64] and summary["conf"] == 0.001
    as_images = main(common + ["--source", str(images), "--out", str(tmp_path / "i"), "--no-draw",
                               "--save-txt"])
    assert len(summary["frames"]) == len(as_images["images"]) == 4
    for frame, image in zip(summary["frames"], as_images["images"]):
        assert len(frame["scores"]) > 0
        for key in ("boxes", "scores", "labels", "class_names"):
            assert frame[key] == image[key], key
    for k in range(4):                            # --save-txt: <stem>_<frame>.txt per frame
        text = (tmp_path / "v" / "labels" / f"clip_{k}.txt").read_text()
        assert text == (tmp_path / "i" / "labels" / f"{k}.txt").read_text()
        assert len(text.splitlines()) == len(summary["frames"][k]["scores"])

    main(common + ["--source", str(source), "--out", str(tmp_path / "nd"), "--no-draw"])
    assert sorted(p.name for p in (tmp_path / "nd").iterdir()) == ["detections.json"]
    assert not any("holds the results of an earlier run" in r.getMessage() for r in caplog.records)
    main(common + ["--source", str(source), "--out", str(tmp_path / "nd"), "--no-draw"])
    assert any("holds the results of an earlier run" in r.getMessage() for r in caplog.records)


def test_video_errors_are_one_line_and_name_the_file(tmp_path):
    from damo_jax.cli.predict import main
    fake = tmp_path / "notavideo.mp4"
    fake.write_bytes(b"\x00" * 300)
    with pytest.raises(SystemExit, match="notavideo.mp4"):
        main(["--config", "ns", "--source", str(fake), "--out", str(tmp_path / "o")])
    folder = tmp_path / "clips"
    folder.mkdir()
    write_video(folder / "a.avi", frames_rgb(2))
    with pytest.raises(SystemExit, match=r"video file\(s\): give one as --source"):
        main(["--config", "ns", "--source", str(folder), "--out", str(tmp_path / "o2")])


def test_a_stream_that_changes_size_is_named_with_its_frame(tmp_path, monkeypatch):
    """A container can carry frames of another size mid-stream (a spliced recording): one error
    naming the file and the frame, not a drawn video of mixed sizes."""
    sizes = [(H, W), (H, W), (H + 2, W)]

    class FakeCapture:
        def __init__(self, path):
            self.k = 0

        def isOpened(self):
            return True

        def read(self):
            if self.k == len(sizes):
                return False, None
            self.k += 1
            return True, np.zeros(sizes[self.k - 1] + (3,), np.uint8)

        def get(self, prop):
            return {cv2.CAP_PROP_FPS: FPS, cv2.CAP_PROP_FRAME_COUNT: 3}.get(prop, 0.0)

        def release(self):
            pass

    from damo_jax.data_pipelines.records import DataError
    clip = tmp_path / "spliced.mp4"
    clip.write_bytes(b"stand-in")
    monkeypatch.setattr(cv2, "VideoCapture", FakeCapture)
    with VideoReader(clip) as reader:
        with pytest.raises(DataError, match=r"spliced.mp4: frame 2 is 160x92, the first frame 160x90"):
            list(reader)


def test_the_drawing_never_replaces_a_user_file(oracle, tmp_path):
    """--out as the video's own folder is refused (another clip.mp4 there would be replaced); a
    file named like the temporary one is left alone; a folder where the drawing goes is refused;
    nothing temporary is left behind."""
    from damo_jax.cli.predict import main
    folder = tmp_path / "videos"
    folder.mkdir()
    source = write_video(folder / "clip.avi", frames_rgb(3))
    theirs = write_video(folder / "clip.mp4", frames_rgb(2), fourcc="mp4v")
    before = theirs.read_bytes()
    with pytest.raises(SystemExit, match="is the folder of --source"):
        main(["--config", "ns", "--source", str(source), "--out", str(folder)])
    assert theirs.read_bytes() == before

    out = tmp_path / "out"
    out.mkdir()
    decoy = out / "clip.partial.mp4"
    decoy.write_bytes(b"a user's file")
    summary = predict_video(oracle, source, out)
    assert decoy.read_bytes() == b"a user's file"
    assert summary["video"]["drawing"] == str(out / "clip.mp4")
    assert sorted(p.name for p in out.iterdir()) == ["clip.mp4", "clip.partial.mp4"]

    (tmp_path / "o2" / "clip.mp4").mkdir(parents=True)
    from damo_jax.errors import ConfigError
    with pytest.raises(ConfigError, match="is a folder"):
        predict_video(oracle, source, tmp_path / "o2")
    assert [p.name for p in (tmp_path / "o2").iterdir()] == ["clip.mp4"]


def test_odd_sizes_are_padded_not_cropped(tmp_path):
    """MPEG-4 needs even sizes (OpenCV's mp4v writer silently drops the last column / row of an
    odd-sized frame): the drawing is padded by one black column / row instead."""
    from damo_jax.inference.video import VideoWriter
    frame = np.full((91, 161, 3), 180, np.uint8)
    writer = VideoWriter(tmp_path / "odd.mp4", 10.0, 161, 91)
    for _ in range(3):
        writer.write(frame)
    back = read_all(writer.finish())[0].astype(int)
    assert back.shape == (92, 162, 3)
    assert abs(back[:91, :161].mean() - 180) < 4                    # mp4v is lossy
    assert back[:91, 160].mean() > 150 and back[90, :161].mean() > 150  # the last column / row kept
    assert back[:, 161].mean() < 60 and back[91, :].mean() < 60         # the black padding


def test_video_hints_and_api_errors(tmp_path, capsys, caplog, oracle):
    """Nothing above --conf: the highest score of the first frames is named, as for images; videos
    in a folder of images are named, not silently passed over; an unknown suffix lists the
    suffixes read; Detector.video names a folder and checks tile like Detector.tiled."""
    from damo_jax.cli.predict import main
    run_dir, _, _ = write_two_class_run(tmp_path)
    source = write_video(tmp_path / "clip.avi", frames_rgb(3))
    main(["--checkpoint", str(run_dir), "--source", str(source), "--out", str(tmp_path / "o"),
          "--conf", "0.999", "--no-progress", "--no-draw"])
    printed = capsys.readouterr().out
    assert "3 frame(s) at 12.5 fps, 0 detection(s)" in printed
    assert re.search(r"the highest score in the first 3 frame\(s\) is 0\.\d+ < --conf 0\.999",
                     printed), printed
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.fromarray(frames_rgb(1)[0]).save(mixed / "f0.png")
    write_video(mixed / "v.avi", frames_rgb(2))
    summary = main(["--checkpoint", str(run_dir), "--source", str(mixed), "--out",
                    str(tmp_path / "o2"), "--no-progress", "--no-draw"])
    assert summary["videos_not_read"] == [str(mixed / "v.avi")]
    assert "1 video file(s)" in caplog.text and "--source" in caplog.text
    odd = tmp_path / "clip.divx"
    odd.write_bytes(b"\x00" * 100)
    with pytest.raises(SystemExit, match=r"videos: \.mp4"):
        main(["--checkpoint", str(run_dir), "--source", str(odd), "--out", str(tmp_path / "o3")])
    with pytest.raises(FileNotFoundError, match="is a folder"):
        next(oracle.video(mixed))
    with pytest.raises(ValueError, match="tile size 0"):
        next(oracle.video(source, tile=0))
