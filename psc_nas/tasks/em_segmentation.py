"""EM neuron segmentation from affinities, as in Funke et al. (the PSC paper's sec. 4.3 pipeline).

    neuron ids ─ affinities_from_labels ─► target (3, D, H, W)          the UNet3D learns this
    predicted affinities ─ segment_affinities ─► neuron ids             watershed + agglomeration
    neuron ids vs. ground truth ─ score_segmentation ─► VI split/merge, adapted Rand error

**Affinities.** Channel ``c`` of ``(3, D, H, W)`` is the edge between a voxel and its predecessor
along axis ``c`` — channels (z, y, x) for axes (D, H, W): ``aff[0, z, y, x]`` links (z, y, x) to
(z-1, y, x). This is the convention of Funke et al.'s gunpowder (neighbourhood -z, -y, -x) and of
waterz. An edge is 1 iff both voxels carry the same neuron id and it is not 0 (background or boundary,
as in gunpowder's ``AddAffinities``); edges leaving the volume (the first slice of each axis) have no
second voxel and are masked out of the loss.

**Segmentation** (:func:`segment_affinities`), one function with two backends:

- ``waterz`` (Funke et al.'s own code, a prebuilt wheel on PyPI): zwatershed fragments, then
  agglomeration with the ``OneMinus<MeanAffinity>`` score.
- ``skimage``: seeded watershed (scikit-image) of the boundary map ``1 - mean affinity`` with seeds at
  the maxima of the distance to the boundary (sampled at the volume's resolution), then the same
  greedy mean-affinity agglomeration written out here: adjacent regions merge, highest mean affinity
  across their boundary first, while it exceeds the threshold. Given the same fragments the two
  backends produce the same segmentation (tested).

``thresholds`` are merge affinities: a higher one merges less. Several thresholds cost one
agglomeration (each is a snapshot of the same merge sequence).

**Scores** (:func:`score_segmentation`): variation of information (scikit-image, in bits) split =
H(segmentation | truth), over-segmentation; merge = H(truth | segmentation), under-segmentation;
their sum is what a search minimises. Adapted Rand error as in the SNEMI3D/CREMI challenges. Truth
voxels labelled 0 are ignored, as CREMI's evaluation ignores its background.
"""

from __future__ import annotations

import heapq
import importlib.util
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

BACKENDS = ("waterz", "skimage")
DEFAULT_THRESHOLDS = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)


def affinities_from_labels(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(affinities, mask), both float32 (3, D, H, W), of a (D, H, W) neuron-id volume."""
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"labels must be a (D, H, W) volume, got shape {labels.shape}")
    affinities = np.zeros((3, *labels.shape), np.float32)
    mask = np.zeros((3, *labels.shape), np.float32)
    for axis in range(3):
        here = [slice(None)] * 3
        before = [slice(None)] * 3
        here[axis], before[axis] = slice(1, None), slice(None, -1)
        voxel, predecessor = labels[tuple(here)], labels[tuple(before)]
        affinities[(axis, *here)] = (voxel == predecessor) & (voxel != 0)
        mask[(axis, *here)] = 1
    return affinities, mask


@dataclass(frozen=True)
class Agglomeration:
    """Segmentations of one affinity volume, one per threshold, and the backend that made them."""

    thresholds: tuple[float, ...]
    segmentations: tuple[np.ndarray, ...]  # (D, H, W) uint64 each; 0 = no region (waterz only)
    backend: str


def default_backend() -> str:
    return "waterz" if importlib.util.find_spec("waterz") else "skimage"


def segment_affinities(
    affinities: np.ndarray,
    thresholds: Sequence[float] = (0.5,),
    *,
    backend: str = "auto",
    fragments: np.ndarray | None = None,
    resolution: Sequence[float] = (1.0, 1.0, 1.0),
) -> Agglomeration:
    """Neuron ids from predicted affinities (3, D, H, W) in [0, 1], one segmentation per threshold.

    ``backend``: ``auto`` (waterz where installed, otherwise skimage), ``waterz`` or ``skimage``.
    ``fragments``: an initial over-segmentation to agglomerate instead of the backend's watershed.
    ``resolution``: voxel size along D, H, W (the skimage watershed's distance transform uses it).
    """
    affinities = np.ascontiguousarray(affinities, dtype=np.float32)
    if affinities.ndim != 4 or affinities.shape[0] != 3:
        raise ValueError(f"affinities must have shape (3, D, H, W), got {affinities.shape}")
    thresholds = tuple(float(t) for t in thresholds)
    if not thresholds or not all(0.0 <= t <= 1.0 for t in thresholds):
        raise ValueError(f"thresholds must be merge affinities in [0, 1], got {thresholds}")
    backend = default_backend() if backend == "auto" else backend
    if backend == "waterz":
        segmentations = _waterz(affinities, thresholds, fragments)
    elif backend == "skimage":
        if fragments is None:
            fragments = watershed_fragments(affinities, resolution=resolution)
        segmentations = agglomerate_mean_affinity(affinities, fragments, thresholds)
    else:
        raise ValueError(f"unknown segmentation backend {backend!r}; known: auto, {', '.join(BACKENDS)}")
    return Agglomeration(thresholds, tuple(segmentations), backend)


def _waterz(affinities: np.ndarray, thresholds: tuple[float, ...], fragments: np.ndarray | None) -> list[np.ndarray]:
    import waterz

    # waterz merges while its score 1 - mean affinity is below the threshold, lowest threshold first.
    order = sorted(range(len(thresholds)), key=lambda i: -thresholds[i])
    if fragments is not None:
        fragments = np.array(fragments, dtype=np.uint64, order="C")  # waterz agglomerates in place
    with _stdout_silenced():  # waterz's C++ core narrates every step on the process's stdout
        results = [
            segmentation.copy()  # waterz reuses one buffer for all thresholds
            for segmentation in waterz.agglomerate(
                affinities, [1.0 - thresholds[i] for i in order], fragments=fragments
            )
        ]
    segmentations: list[np.ndarray] = [np.empty(0)] * len(thresholds)
    for index, segmentation in zip(order, results):
        segmentations[index] = segmentation
    return segmentations


@contextmanager
def _stdout_silenced() -> Iterator[None]:
    """Both Python's ``sys.stdout`` and the process's file descriptor 1 go to /dev/null meanwhile."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as devnull, redirect_stdout(devnull):
            os.dup2(devnull.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def watershed_fragments(affinities: np.ndarray, *, resolution: Sequence[float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """Over-segmentation (uint64; 0 = no region): seeded watershed of the boundary map.

    Seeds are the connected plateaus of local maxima of the distance from a voxel to the nearest
    boundary voxel (one with an edge of at most 0.5), as in the fragment step of Sheridan et al.'s lsd
    pipeline. A voxel none of whose edges reaches 0.5 belongs to no region (as zwatershed leaves
    voxels below its low threshold), so background never joins neurons into one fragment.
    """
    from skimage.segmentation import watershed

    weakest, mean, strongest = incident_affinity(affinities)
    boundary = 1.0 - mean
    assigned = strongest >= 0.5
    inside = weakest > 0.5
    distance = ndimage.distance_transform_edt(inside, sampling=resolution)
    peaks = (distance == ndimage.maximum_filter(distance, size=3)) & inside
    seeds, _ = ndimage.label(peaks)
    # Voxels no seed reaches stay 0: mostly noise in the background, which would bridge neurons.
    return watershed(boundary, seeds, mask=assigned).astype(np.uint64)


def incident_affinity(affinities: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Minimum, mean and maximum affinity of the (up to six) edges at each voxel."""
    weakest, strongest = np.full((2, *affinities.shape[1:]), np.inf, np.float32)
    strongest[:] = -np.inf
    total = np.zeros(affinities.shape[1:], np.float32)
    count = np.zeros(affinities.shape[1:], np.float32)
    for axis in range(3):
        here = [slice(None)] * 3
        before = [slice(None)] * 3
        here[axis], before[axis] = slice(1, None), slice(None, -1)
        edge = affinities[(axis, *here)]  # between each voxel of ``here`` and its predecessor in ``before``
        for side in (tuple(here), tuple(before)):
            np.minimum(weakest[side], edge, out=weakest[side])
            np.maximum(strongest[side], edge, out=strongest[side])
            total[side] += edge
            count[side] += 1
    return weakest, total / count, strongest


def agglomerate_mean_affinity(
    affinities: np.ndarray, fragments: np.ndarray, thresholds: Sequence[float]
) -> list[np.ndarray]:
    """Greedy merging of adjacent regions by mean affinity across their boundary (waterz's MeanAffinity).

    The boundary of two regions is every affinity edge between a voxel of one and a voxel of the
    other; after a merge the new region's boundary statistics are the sums of the merged ones. A
    priority queue with lazy invalidation gives the merge order; one segmentation per threshold.
    """
    fragments = np.asarray(fragments)
    ids, compact = np.unique(fragments, return_inverse=True)
    compact = compact.reshape(fragments.shape)
    edges: dict[int, dict[int, list[float]]] = {node: {} for node in range(len(ids))}
    for (u, v), (total, count) in _boundary_statistics(affinities, compact).items():
        if ids[u] != 0:  # as in waterz, fragment 0 is no region and never merges
            edges[u][v] = edges[v][u] = [total, count]
    parent = list(range(len(ids)))
    queue = [(-total / count, u, v) for u in edges for v, (total, count) in edges[u].items() if u < v]
    heapq.heapify(queue)

    segmentations: dict[float, np.ndarray] = {}
    for threshold in sorted(set(thresholds), reverse=True):
        while queue and -queue[0][0] > threshold:
            negative_mean, u, v = heapq.heappop(queue)
            if parent[u] != u or parent[v] != v or v not in edges[u]:
                continue  # a region of this entry was merged away since it was queued
            total, count = edges[u][v]
            if total / count != -negative_mean:
                continue  # stale: the pair's statistics changed and a newer entry is queued
            keep, gone = (u, v) if len(edges[u]) >= len(edges[v]) else (v, u)
            parent[gone] = keep
            del edges[keep][gone]
            for neighbour, (n_total, n_count) in edges.pop(gone).items():
                if neighbour == keep:
                    continue
                del edges[neighbour][gone]
                merged = edges[keep].setdefault(neighbour, [0.0, 0])
                merged[0] += n_total
                merged[1] += n_count
                edges[neighbour][keep] = merged
                heapq.heappush(queue, (-merged[0] / merged[1], *sorted((keep, neighbour))))
        segmentation = _resolve(parent)[compact].astype(np.uint64) + 1
        segmentation[fragments == 0] = 0
        segmentations[threshold] = segmentation
    return [segmentations[t] for t in thresholds]


def _boundary_statistics(affinities: np.ndarray, regions: np.ndarray) -> dict[tuple[int, int], tuple[float, int]]:
    """(sum, count) of the affinity edges between every pair of adjacent regions (u < v)."""
    regions = regions.astype(np.int64)
    size = int(regions.max()) + 1
    keys, values = [], []
    for axis in range(3):
        here = [slice(None)] * 3
        before = [slice(None)] * 3
        here[axis], before[axis] = slice(1, None), slice(None, -1)
        a, b = regions[tuple(here)].ravel(), regions[tuple(before)].ravel()
        crossing = a != b
        keys.append(np.minimum(a, b)[crossing] * size + np.maximum(a, b)[crossing])  # one int per pair u < v
        values.append(affinities[(axis, *here)].ravel()[crossing].astype(np.float64))
    unique, inverse = np.unique(np.concatenate(keys), return_inverse=True)
    totals = np.bincount(inverse, weights=np.concatenate(values), minlength=len(unique))
    counts = np.bincount(inverse, minlength=len(unique))
    return {divmod(int(key), size): (float(t), int(c)) for key, t, c in zip(unique, totals, counts)}


def _resolve(parent: list[int]) -> np.ndarray:
    """Each node's root in a forest given by parent pointers."""
    roots = np.asarray(parent)
    while True:
        hop = roots[roots]
        if np.array_equal(hop, roots):
            return roots
        roots = hop


def score_segmentation(segmentation: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """VI split, merge and sum (bits) and adapted Rand error of a segmentation; truth 0 is ignored."""
    from skimage.metrics import adapted_rand_error, variation_of_information

    # scikit-image's contingency table is as large as the largest id, and CREMI ids reach 2**64
    truth, segmentation = _consecutive(truth), _consecutive(segmentation)
    split, merge = variation_of_information(truth, segmentation, ignore_labels=(0,))
    arand, _, _ = adapted_rand_error(truth, segmentation, ignore_labels=(0,))
    return {"vi_split": float(split), "vi_merge": float(merge), "vi_sum": float(split + merge), "arand": float(arand)}


def _consecutive(ids: np.ndarray) -> np.ndarray:
    """Non-negative ids renumbered 1, 2, ... in order; 0 stays 0."""
    values, inverse = np.unique(np.asarray(ids), return_inverse=True)
    return inverse.reshape(np.shape(ids)) + int(values[0] != 0)


class SegmentationScores:
    """VI and adapted Rand error of predicted affinities, averaged over the evaluated volumes.

    ``update(prediction, batch)``: ``prediction`` are affinity logits (N, 3, D, H, W);
    ``batch[LABELS]`` the neuron ids (N, 1, D, H, W) or (N, D, H, W). Each volume is segmented at
    every threshold; ``compute()`` reports the threshold whose mean VI sum is lowest (tuned on the
    evaluated volumes, as EM papers choose the agglomeration threshold on validation data), its
    ``vi_split``, ``vi_merge``, ``vi_sum`` and ``arand``, and ``merge_threshold``.
    """

    LABELS = "neuron_ids"

    def __init__(
        self,
        thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
        *,
        backend: str = "auto",
        resolution: Sequence[float] = (1.0, 1.0, 1.0),
    ) -> None:
        self.thresholds = tuple(thresholds)
        self.backend = default_backend() if backend == "auto" else backend
        self.resolution = tuple(resolution)
        self.reset()

    def reset(self) -> None:
        self._scores: list[list[dict[str, float]]] = []  # per volume, per threshold

    def update(self, prediction: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> None:
        affinities = torch.sigmoid(prediction.detach().float()).cpu().numpy()
        labels = batch[self.LABELS].detach().cpu().numpy()
        labels = labels.reshape(len(labels), *labels.shape[-3:])
        for sample, truth in zip(affinities, labels):
            result = segment_affinities(sample, self.thresholds, backend=self.backend, resolution=self.resolution)
            self._scores.append([score_segmentation(s, truth) for s in result.segmentations])

    def compute(self) -> dict[str, float]:
        if not self._scores:
            raise ValueError("SegmentationScores.compute() before any update()")
        means = [
            {key: float(np.mean([volume[i][key] for volume in self._scores])) for key in self._scores[0][i]}
            for i in range(len(self.thresholds))
        ]
        best = min(range(len(self.thresholds)), key=lambda i: means[i]["vi_sum"])
        return {**means[best], "merge_threshold": self.thresholds[best]}
