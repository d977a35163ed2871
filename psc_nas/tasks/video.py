"""Shared pieces of video classification: the UCF101 layout, PyAV decoding, clips, clip/video accuracy.

UCF101 as distributed::

    <data_dir>/<Class>/v_<Class>_g<GG>_c<CC>.avi      GG: group (the same actors and scene), CC: clip
    <data_dir>/ucfTrainTestlist/classInd.txt           "1 ApplyEyeMakeup" ... (also accepted in <data_dir>)
    <data_dir>/ucfTrainTestlist/trainlist01.txt        "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1"
    <data_dir>/ucfTrainTestlist/testlist01.txt         "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi"

A video is decoded whole with PyAV (UCF101 videos are a few seconds long), every frame scaled to
H×W by FFmpeg's scaler (the PSC paper downsamples to 64×64; the aspect ratio is not kept) as RGB.
A clip is T consecutive frames; a video shorter than T is looped. Training takes one random clip per
video and visit; evaluation takes ``clips_per_video`` evenly spaced clips (the paper averages 20),
and :class:`ClipVideoAccuracy` scores each clip and each video (clip probabilities averaged).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from psc_nas.tasks.base import DataError

SPLIT_DIR = "ucfTrainTestlist"
_VIDEO_NAME = re.compile(r"v_(?P<cls>[^_/]+)_g(?P<group>\d+)_c(?P<clip>\d+)\.\w+")


@dataclass(frozen=True)
class VideoEntry:
    path: Path
    label: int  # 0-based class index
    group: int  # UCF101 group (same actors/scene); 0 when the name does not follow the pattern


def split_file(data_dir: str | Path, name: str) -> Path:
    """``name`` (e.g. ``trainlist01.txt``) in ``<data_dir>/ucfTrainTestlist/`` or ``<data_dir>/``."""
    data_dir = Path(data_dir).expanduser()
    if not data_dir.is_dir():
        raise DataError(data_dir, "video data directory not found")
    for candidate in (data_dir / SPLIT_DIR / name, data_dir / name):
        if candidate.is_file():
            return candidate
    raise DataError(data_dir / SPLIT_DIR / name, "split file not found (UCF101 layout: ucfTrainTestlist/)")


def class_names(data_dir: str | Path) -> list[str]:
    """Class names in label order: from ``classInd.txt``, else the class folders sorted by name."""
    data_dir = Path(data_dir).expanduser()
    try:
        index_file = split_file(data_dir, "classInd.txt")
    except DataError:
        names = sorted(d.name for d in data_dir.iterdir() if d.is_dir() and d.name != SPLIT_DIR)
        if not names:
            raise DataError(data_dir, "no class folders and no classInd.txt") from None
        return names
    names = []
    for number, line in _lines(index_file):
        fields = line.split()
        if len(fields) != 2 or not fields[0].isdigit() or int(fields[0]) != len(names) + 1:
            raise DataError(index_file, f"line {number}: expected '{len(names) + 1} <ClassName>', got {line!r}")
        names.append(fields[1])
    return names


def read_split(data_dir: str | Path, split: str = "train", fold: int = 1) -> list[VideoEntry]:
    """The videos of ``trainlist0<fold>.txt`` or ``testlist0<fold>.txt``; every listed file must exist."""
    data_dir = Path(data_dir).expanduser()
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    listing = split_file(data_dir, f"{split}list{fold:02d}.txt")
    names = class_names(data_dir)
    index = {name: i for i, name in enumerate(names)}
    entries = []
    for number, line in _lines(listing):
        fields = line.split()
        relative = fields[0] if fields else ""
        class_name = relative.split("/")[0] if "/" in relative else None
        if len(fields) not in (1, 2) or class_name not in index:
            raise DataError(
                listing, f"line {number}: expected '<Class>/<video> [label]' with a known class, got {line!r}"
            )
        label = index[class_name]
        if len(fields) == 2 and fields[1] != str(label + 1):
            raise DataError(listing, f"line {number}: label {fields[1]} but {class_name} is class {label + 1}")
        path = data_dir / relative
        if not path.is_file():
            raise DataError(listing, f"line {number}: {relative} is not in {data_dir}")
        match = _VIDEO_NAME.fullmatch(path.name)
        entries.append(VideoEntry(path, label, int(match["group"]) if match else 0))
    if not entries:
        raise DataError(listing, "lists no videos")
    return entries


def _lines(path: Path) -> list[tuple[int, str]]:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(path, f"unreadable ({type(err).__name__}: {err})") from None
    return [(number, line.strip()) for number, line in enumerate(text.splitlines(), 1) if line.strip()]


def read_video(path: str | Path, *, size: tuple[int, int]) -> np.ndarray:
    """All frames of a video as uint8 (T, H, W, 3) RGB, scaled to ``size`` = (H, W)."""
    import av

    path = Path(path)
    height, width = size
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise DataError(path, "has no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            frames = [
                frame.to_ndarray(format="rgb24", width=width, height=height) for frame in container.decode(stream)
            ]
    except DataError:
        raise
    except (av.FFmpegError, OSError, ValueError) as err:
        reason = getattr(err, "strerror", None) or str(err)  # FFmpeg's own words, without the path again
        raise DataError(path, f"not a readable video ({type(err).__name__}: {reason})") from None
    if not frames:
        raise DataError(path, "has no video frames")
    return np.stack(frames)


def clip_starts(num_frames: int, frames_per_clip: int, count: int) -> list[int]:
    """``count`` evenly spaced clip starts covering the video (0 for a video shorter than a clip)."""
    last = max(num_frames - frames_per_clip, 0)
    return [round(i * last / (count - 1)) if count > 1 else last // 2 for i in range(count)]


def take_clip(frames: np.ndarray, start: int, frames_per_clip: int) -> torch.Tensor:
    """Float (3, T, H, W) in [0, 1] of ``frames_per_clip`` frames from ``start``, looping a short video."""
    indices = (start + np.arange(frames_per_clip)) % len(frames)
    return torch.from_numpy(frames[indices]).permute(3, 0, 1, 2).float().div_(255.0)


class VideoClips(Dataset):
    """Clips of the listed videos as dicts ``{"video": (3, T, H, W), "label": int, "index": int}``.

    ``clips_per_video=None`` (training): one random clip per video per visit, from a generator seeded
    with ``seed`` and the visit. An integer (evaluation): that many evenly spaced clips per video,
    item ``i`` being clip ``i % clips_per_video`` of video ``i // clips_per_video``; ``index`` is the
    video's position in ``entries`` (what :class:`ClipVideoAccuracy` groups clips by).
    """

    def __init__(
        self,
        entries: Sequence[VideoEntry],
        *,
        frames_per_clip: int,
        size: tuple[int, int],
        clips_per_video: int | None = None,
        seed: int = 0,
    ) -> None:
        self.entries = list(entries)
        self.frames_per_clip = frames_per_clip
        self.size = tuple(size)
        self.clips_per_video = clips_per_video
        self.seed = seed
        self._visits = 0

    def __len__(self) -> int:
        return len(self.entries) * (self.clips_per_video or 1)

    def __getitem__(self, item: int) -> dict[str, object]:
        video, clip = divmod(item, self.clips_per_video or 1)
        entry = self.entries[video]
        frames = read_video(entry.path, size=self.size)  # type: ignore[arg-type]
        if self.clips_per_video is None:
            self._visits += 1
            rng = np.random.default_rng([self.seed, item, self._visits])
            start = int(rng.integers(max(len(frames) - self.frames_per_clip, 0) + 1))
        else:
            start = clip_starts(len(frames), self.frames_per_clip, self.clips_per_video)[clip]
        return {"video": take_clip(frames, start, self.frames_per_clip), "label": entry.label, "index": video}


class ClipVideoAccuracy:
    """Top-1 accuracy of clips and of videos, a video's prediction being its clips' mean probability.

    ``update(prediction, batch)``: ``prediction`` logits (N, classes); ``batch["label"]`` (N,) and
    ``batch["index"]`` (N,), the video each clip belongs to. ``compute()`` gives ``clip_top1`` and
    ``video_top1`` in [0, 1].
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._correct_clips = 0
        self._clips = 0
        self._probabilities: dict[int, torch.Tensor] = {}
        self._labels: dict[int, int] = {}

    def update(self, prediction: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> None:
        probabilities = torch.softmax(prediction.detach().float(), dim=1).cpu()
        labels = torch.as_tensor(batch["label"]).cpu()
        videos = torch.as_tensor(batch["index"]).cpu()
        self._correct_clips += int((probabilities.argmax(1) == labels).sum())
        self._clips += len(labels)
        for probability, label, video in zip(probabilities, labels.tolist(), videos.tolist()):
            if self._labels.setdefault(video, label) != label:
                raise ValueError(f"video {video} has clips labelled {self._labels[video]} and {label}")
            self._probabilities[video] = self._probabilities.get(video, 0) + probability

    def compute(self) -> dict[str, float]:
        if not self._clips:
            raise ValueError("ClipVideoAccuracy.compute() before any update()")
        correct_videos = sum(int(p.argmax()) == self._labels[v] for v, p in self._probabilities.items())
        return {"clip_top1": self._correct_clips / self._clips, "video_top1": correct_videos / len(self._probabilities)}
