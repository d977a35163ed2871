"""The video task's default data: synthetic action videos whose class is carried only by motion.

Nothing ships labelled action video, so it is drawn (fixed seed) and written as real MPEG-4 AVI
files in the UCF101 layout (:mod:`psc_nas.tasks.video` reads both the same way). Each video shows
one object, an arrow of the same shape in every class, on a textured background, with distractors
(small squares on random walks), camera shake, brightness jitter and noise. The class is how the
object moves:

    MoveLeft, MoveRight, MoveUp, MoveDown       translation, 0.6 px/frame
    RotateClockwise, RotateCounterclockwise     rotation, 6°/frame
    Grow, Shrink                                scaling, 0.15 px/frame
    BlinkFast, BlinkSlow                        shown and hidden for 2 or 6 frames at a time

**No frame tells the class.** Every class draws the object's position, size and angle from the same
per-frame distribution: a moving coordinate sweeps a uniform start plus a uniform offset, and a
still one is drawn from that same sum; the angle is uniform. Each class is the time reversal of
another (left/right, up/down, clockwise/counterclockwise, grow/shrink), so even the unordered set of
a video's frames is equally likely under both; only the blinking pair differs in its frames (the
object is hidden in half of them), and BlinkFast and BlinkSlow only in the rhythm. A network that
looks at frames one by one and pools over time can at best tell the blinking pair from the rest:
20% accuracy on 10 classes, chance 10%. Measured (docs/benchmarks/video.md, 384 Adam steps, 3 seeds):
a ResNet3D-34 with no layer mixing frames scores 11% clip top-1, the all-1x3x3 one (its 3x7x7 stem
sees 3 frames) 22%, the all-3x3x3 one 37%.

Groups play the role of UCF101's actors/scenes: a group fixes the background and distractor
colours; split 1 tests on groups 1-3 and trains on the rest, as UCF101's split 1 tests on groups 1-7
of 25. 10 classes × 10 groups × 2 clips, 40 frames of 64×64 each: 200 videos, 12 MB, built in
about 20 s.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from scipy import ndimage

from psc_nas.tasks.build_cache import cache_root, cached_build
from psc_nas.tasks.video import SPLIT_DIR

BUILDER_VERSION = 1
ACTIONS = (
    "MoveLeft",
    "MoveRight",
    "MoveUp",
    "MoveDown",
    "RotateClockwise",
    "RotateCounterclockwise",
    "Grow",
    "Shrink",
    "BlinkFast",
    "BlinkSlow",
)
GROUPS, CLIPS, TEST_GROUPS = 10, 2, 3
FRAMES, SIZE, FPS = 40, 64, 25
_SHIFT, _TURN, _SCALE = 0.6, math.radians(6.0), 0.15  # per frame
_POSITION = (14.0, 26.0)  # a coordinate is uniform on this plus uniform on [0, _SHIFT·(FRAMES-1)]
_RADIUS = (8.0, 12.0)  # object radius: uniform on this plus uniform on [0, _SCALE·(FRAMES-1)]
_HALF_PERIOD = {"BlinkFast": 2, "BlinkSlow": 6}
# an arrow pointing along +x, in units of the object's radius; no symmetry, so turning shows
_ARROW = np.array([[1.0, 0.0], [0.1, 0.75], [0.1, 0.3], [-1.0, 0.3], [-1.0, -0.3], [0.1, -0.3], [0.1, -0.45]])


def embedded_videos(
    cache_dir: str | Path | None = None, *, seed: int = 0, groups: int = GROUPS, clips: int = CLIPS
) -> Path:
    """Directory of the synthetic action videos in UCF101 layout; built if absent, stale or corrupt."""
    if groups <= TEST_GROUPS or clips < 1:
        raise ValueError(
            f"need more than {TEST_GROUPS} groups (the test groups) and a clip each, got {groups}, {clips}"
        )
    params = {"seed": int(seed), "actions": list(ACTIONS), "groups": groups, "clips": clips, "frames": FRAMES}
    target = (
        Path(cache_dir) if cache_dir is not None else cache_root() / "video-embedded"
    ) / f"g{groups}c{clips}-seed{seed}"
    return cached_build(
        target, version=BUILDER_VERSION, params=params, write=lambda d: _write_dataset(d, seed, groups, clips)
    )


def _write_dataset(directory: Path, seed: int, groups: int, clips: int) -> None:
    lists: dict[str, list[str]] = {"train": [], "test": []}
    for group in range(1, groups + 1):
        scene = np.random.default_rng([seed, group])
        background, distractor_colour = _scene(scene)
        for label, action in enumerate(ACTIONS):
            (directory / action).mkdir(exist_ok=True)
            for clip in range(1, clips + 1):
                rng = np.random.default_rng([seed, group, label, clip])
                relative = f"{action}/v_{action}_g{group:02d}_c{clip:02d}.avi"
                frames = render(action, rng, background=background, distractor_colour=distractor_colour)
                write_video(directory / relative, frames)
                split = "test" if group <= TEST_GROUPS else "train"
                lists[split].append(relative if split == "test" else f"{relative} {label + 1}")
    (directory / SPLIT_DIR).mkdir()
    (directory / SPLIT_DIR / "classInd.txt").write_text("".join(f"{i + 1} {a}\n" for i, a in enumerate(ACTIONS)))
    for split, lines in lists.items():
        (directory / SPLIT_DIR / f"{split}list01.txt").write_text("".join(f"{line}\n" for line in lines))


def write_video(path: Path, frames: np.ndarray, *, fps: int = FPS) -> None:
    """uint8 (T, H, W, 3) RGB frames as an MPEG-4 Part 2 AVI (UCF101's codec family)."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.bit_rate = 600_000  # high for 64×64: compression must not smear the motion
        for array in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode())


def trajectory(action: str, rng: np.random.Generator, frames: int = FRAMES) -> dict[str, np.ndarray]:
    """The object's per-frame ``x``, ``y`` (centre, px), ``radius`` (px), ``angle`` (rad), ``visible``."""
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}; known: {', '.join(ACTIONS)}")
    t = np.arange(frames, dtype=np.float64)
    span = frames - 1

    def swept(low_high, rate: float, moving: bool, sign: float = 1.0) -> np.ndarray:
        start = rng.uniform(*low_high)
        if moving:  # sweeps [start, start + rate·span], forwards or backwards
            return start + (rate * t if sign > 0 else rate * (span - t))
        return np.full(frames, start + rng.uniform(0, rate * span))

    x = swept(_POSITION, _SHIFT, action in ("MoveLeft", "MoveRight"), -1.0 if action == "MoveLeft" else 1.0)
    y = swept(_POSITION, _SHIFT, action in ("MoveUp", "MoveDown"), -1.0 if action == "MoveUp" else 1.0)
    radius = swept(_RADIUS, _SCALE, action in ("Grow", "Shrink"), -1.0 if action == "Shrink" else 1.0)
    turn = {"RotateClockwise": -_TURN, "RotateCounterclockwise": _TURN}.get(action, 0.0)
    angle = rng.uniform(0, 2 * math.pi) + turn * t
    visible = np.ones(frames, bool)
    if action in _HALF_PERIOD:
        half = _HALF_PERIOD[action]
        visible = (t.astype(int) + rng.integers(2 * half)) // half % 2 == 0
    return {"x": x, "y": y, "radius": radius, "angle": angle, "visible": visible}


def render(
    action: str,
    rng: np.random.Generator,
    *,
    background: np.ndarray,
    distractor_colour: np.ndarray,
    frames: int = FRAMES,
) -> np.ndarray:
    """uint8 (T, SIZE, SIZE, 3) RGB frames of one video."""
    from skimage.draw import polygon

    path = trajectory(action, rng, frames)
    colour = rng.uniform(0.55, 1.0, 3)
    distractors = _random_walks(rng, count=3, frames=frames)
    supersample = 2
    fine = SIZE * supersample
    video = np.empty((frames, SIZE, SIZE, 3), np.float32)
    for i in range(frames):
        canvas = np.zeros((fine, fine), np.float32)
        if path["visible"][i]:
            rotation = np.array(
                [
                    [math.cos(path["angle"][i]), -math.sin(path["angle"][i])],
                    [math.sin(path["angle"][i]), math.cos(path["angle"][i])],
                ]
            )
            corners = (_ARROW @ rotation.T) * path["radius"][i] + [path["x"][i], path["y"][i]]
            rows, cols = polygon(corners[:, 1] * supersample, corners[:, 0] * supersample, canvas.shape)
            canvas[rows, cols] = 1.0
        coverage = canvas.reshape(SIZE, supersample, SIZE, supersample).mean((1, 3))[..., None]
        frame = background * (1 - coverage) + colour * coverage
        for x, y in distractors[:, i]:
            box = (slice(max(int(y) - 2, 0), max(int(y) + 2, 0)), slice(max(int(x) - 2, 0), max(int(x) + 2, 0)))
            frame[box] = distractor_colour
        shake = rng.integers(-1, 2, 2)
        video[i] = np.roll(frame, shake, axis=(0, 1)) * rng.uniform(0.96, 1.04)
    video += rng.normal(0, 0.03, video.shape)
    return (np.clip(video, 0, 1) * 255).round().astype(np.uint8)


def _scene(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A group's smooth coloured background texture and its distractors' colour."""
    texture = np.stack([ndimage.gaussian_filter(rng.normal(0, 1, (SIZE, SIZE)), 4, mode="wrap") for _ in range(3)], -1)
    texture = 0.25 + 0.1 * texture / texture.std() + rng.uniform(-0.05, 0.05, 3)
    return np.clip(texture, 0, 0.5).astype(np.float32), rng.uniform(0.3, 0.9, 3)


def _random_walks(rng: np.random.Generator, *, count: int, frames: int) -> np.ndarray:
    """(count, frames, 2) positions of points drifting with persistent random velocities, wrapping around."""
    velocity = np.cumsum(rng.normal(0, 0.3, (count, frames, 2)), axis=1) * 0.3
    return (rng.uniform(0, SIZE, (count, 1, 2)) + np.cumsum(velocity, axis=1)) % SIZE
