"""Faster CPU forward paths for any graph op, on exactly the reference module's parameters.

``FastGraphConv`` subclasses ``GraphConv`` and only changes how each node's conv is computed, so
its ``state_dict`` (names, shapes) is the reference's: checkpoints and exports are interchangeable
whichever implementation ran. Implementations, by name (each executes exactly ``spec.cost()`` MACs):

- ``reference``: ``GraphConv``, ``nn.Conv3d`` per node in NCDHW.
- ``channels_last``: every conv runs on a channels_last_3d tensor (oneDNN's fast layout here).
- ``folded``: channels_last, and every conv whose kernel and stride are 1 along D runs as a 2D
  conv over ``(N·D, C, H, W)``, which in channels_last_3d is a free view. oneDNN's 2D kernels
  beat its 3D ones for these shapes (1×3×3, 1×1×3, 1×3×1, 1×1×1).
- ``depthwise``: ``folded``, and every depthwise conv (groups = channels, no bias) of a training
  step runs ``depthwise.depthwise_conv3d``: oneDNN's forward with a backward of psc-nas's C++
  kernel (inference, tracing and export run the plain conv: same forward, portable graphs); every
  thin grouped 3x3x3 conv (stride 1, no bias, fewer than 16 output channels a group: csn_ir where
  C_in ≠ C_out, e.g. DenseNet3D's C → 28 layers in 4 groups) on an input of at least 16³ runs
  ``tapconv.tap_conv3d``, forward and backward, in training and inference (not tracing or export). The
  kernels are built (or loaded from the cache) when such a module is built; where they cannot be, this
  implementation is exactly ``folded``. ip-CSN's pair at stride 1 (a 1x1x1 conv, then a depthwise 3x3x3 conv of its
  output, up to 64 channels) runs ``pwdw.pointwise_depthwise``, both convs in one pass forward and one backward, in
  training and inference (not tracing or export).

Which one ``build()`` runs by default is each family's measured rule (``OpSpec.fast_impl``); a family
may offer more implementations of its own (CAKES: ``masked``, ``planes`` and ``taps``, in ``cakes.py``).

Fast implementations return channels_last_3d tensors: converting back would cost a copy per op,
and every torch op downstream accepts either layout with identical values. Every conv calls oneDNN directly
(``direct_onednn``: PyTorch would run its own NCDHW kernel for one sample's small convs and, on one thread, for 1x1x1
convs), and a dense conv of at least 256 channels over at most 128 output positions runs as one matrix product
(``as_product``). The paths were measured on CPU only; on other devices the reference forward runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import prod
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import conv_flop_count, register_flop_formula

from psc_nas.device import CPU_LAYOUT
from psc_nas.ops import depthwise, pwdw, tapconv
from psc_nas.ops._conv import conv_out_size
from psc_nas.ops.graph import GraphConv

if TYPE_CHECKING:
    from psc_nas.ops.base import Op

EXACT_IMPLS = ("reference", "channels_last", "folded", "depthwise")
# Output channels a group below which a grouped conv runs the tap-conv kernel (docs/benchmarks/ops.md: DenseNet3D's
# csn_ir convs, 7 outputs a group, 1.1-1.5x faster per training pass, 1.4-2.2x forward than oneDNN's grouped conv).
THIN_GROUP = 16
# ... and only on inputs of at least 16³ positions: at 8³ (C = 208 → 28) oneDNN's was 1.3-1.5x faster.
TAPS_MIN_POSITIONS = 16**3


class FastGraphConv(GraphConv):
    """``GraphConv`` computed in channels_last_3d, optionally with D-flat convs folded into 2D ones."""

    def __init__(self, spec: Op, impl: str) -> None:
        if impl not in EXACT_IMPLS[1:]:
            raise ValueError(f"impl must be one of {list(EXACT_IMPLS[1:])} here, got {impl!r}")
        super().__init__(spec)
        self.impl = impl
        self.fold = impl in ("folded", "depthwise")
        # Build (once per machine) or load the kernels now, not inside the first timed forward.
        self.kernel = impl == "depthwise" and has_depthwise_conv(spec) and depthwise.KERNEL.available()
        self.taps = impl == "depthwise" and any(map(thin_grouped, self.convs)) and tapconv.KERNEL.available()
        self.fused = impl == "depthwise" and pwdw.fuses(self.graph) and pwdw.KERNEL.available()

    def run_conv(self, layer: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return layer(x)
        if (
            self.kernel
            and training_step(x, layer.weight)
            and depthwise.supports(layer.weight, layer.bias, layer.groups, layer.padding)
        ):
            return depthwise.depthwise_conv3d(x, layer.weight, list(layer.stride))
        if (
            self.taps
            and x.shape[2:].numel() >= TAPS_MIN_POSITIONS
            and thin_grouped(layer)
            and tapconv.supports(x, layer.weight)
            and not tracing()
        ):
            return tapconv.tap_conv3d(x, layer.weight, [layer.out_channels], [tapconv.CUBE], layer.groups)
        return conv(x, layer.weight, layer.bias, layer.stride, layer.padding, layer.groups, self.fold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return super().forward(x)
        x = x.contiguous(memory_format=CPU_LAYOUT)
        if self.fused and not tracing() and pwdw.supports(x, *self.convs):
            pointwise, depthwise_conv = self.convs
            return pwdw.pointwise_depthwise(x, pointwise.weight, depthwise_conv.weight)
        return super().forward(x)


def conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    groups: int,
    fold: bool,
) -> torch.Tensor:
    """3D conv of a channels_last_3d ``x``; with ``fold``, a D-flat kernel runs as a 2D conv; a wide dense conv over
    few positions as one matrix product (``as_product``)."""
    if as_product(x, weight, groups, stride, padding):
        return conv_as_product(x, weight, bias, stride, padding)
    if fold and folds(weight.shape[2], stride[0]):
        n, _, depth, height, width = x.shape
        planes = x.transpose(1, 2).reshape(n * depth, -1, height, width)  # a view in channels_last_3d
        y = conv_nd(planes, weight.squeeze(2), bias, stride[1:], padding[1:], groups)
        return y.reshape(n, depth, *y.shape[1:]).transpose(1, 2)
    return conv_nd(x, weight, bias, stride, padding, groups)


def conv_nd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    groups: int,
) -> torch.Tensor:
    """``F.conv2d`` or ``F.conv3d`` by ``x``'s dims; oneDNN's conv called directly where ``direct_onednn`` says, with
    both tensors channels_last, as PyTorch passes them on (no-ops in a placed network)."""
    if direct_onednn(x, weight):
        layout = torch.channels_last if x.dim() == 4 else CPU_LAYOUT
        x, weight = (t.contiguous(memory_format=layout) for t in (x, weight))
        return torch.mkldnn_convolution(x, weight, bias, list(padding), list(stride), [1] * (x.dim() - 2), groups)
    conv_fn = F.conv2d if x.dim() == 4 else F.conv3d
    return conv_fn(x, weight, bias, tuple(stride), tuple(padding), 1, groups)


# A dense conv with at least this many input and output channels ...
PRODUCT_CHANNELS = 256
# ... over at most this many output positions in the whole batch runs as one matrix product (``as_product``).
PRODUCT_ROWS = 128


def as_product(
    x: torch.Tensor, weight: torch.Tensor, groups: int, stride: Sequence[int], padding: Sequence[int]
) -> bool:
    """Whether ``conv`` runs a conv as ``conv_as_product``: dense (one group), 'same' padding, float32 on the CPU, at
    least ``PRODUCT_CHANNELS`` input and output channels, at most ``PRODUCT_ROWS`` output positions over the batch,
    not while tracing or exporting.

    oneDNN's backward of such a conv (the deep stages of ResNet3D and UNet3D: 512 channels over 2 x 1 x 1 or 2³
    positions) ran at 10-20 GMAC/s and reordered the channels_last weight twice per call (two copies of 28 MB for a
    512 -> 512 3x3x3 conv, 15 ms each): a ResNet3D-34 training step on 16 x 32² clips spent 55% of its time in its
    last stage. Within these bounds the product's training pass was 1.1-12x faster than oneDNN's over the shapes
    measured (256-1152 channels; 3x3x3, 1x3x3, 3x1x1 and 1x1x1 kernels; 1-32 positions a sample, batch 1-8), outside
    them 0.2-1.4x (thin outputs such as 512 -> 28, 64-128 channels, more positions); the forward alone 1.6-7.6x for
    one sample (the latency objective's), 0.76-1.0x at batch 4-8 with 1-2 positions a sample, calls of 0.4-1.7 ms
    (docs/benchmarks/ops.md, fourteenth session; measured on one Intel Xeon)."""
    kernel = weight.shape[2:]
    if not (groups == 1 and min(weight.shape[:2]) >= PRODUCT_CHANNELS and x.device.type == "cpu" and x.dim() == 5):
        return False
    positions = prod(conv_out_size(size, k, step) for size, k, step in zip(x.shape[2:], kernel, stride))
    return (
        x.shape[0] * positions <= PRODUCT_ROWS
        and tuple(padding) == tuple(k // 2 for k in kernel)
        and x.dtype == weight.dtype == torch.float32
        and not tracing()
    )


def conv_as_product(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: Sequence[int], padding: Sequence[int]
) -> torch.Tensor:
    """``F.conv3d(x, weight, bias, stride, padding)`` (one group, 'same' padding) as one matrix product: each output
    position's taps gathered into a row of T·C_in values (T taps), times the (C_out, T·C_in) weight, a free view of a
    channels_last_3d weight; channels_last_3d out. Autograd's backward is two products and the gather's sum. It
    executes the conv's MACs, the padded taps' included, and ``FlopCounterMode`` counts them as the conv's."""
    n = x.shape[0]
    kernel = weight.shape[2:]
    (pd, ph, pw), (sd, sh, sw) = padding, stride
    od, oh, ow = (conv_out_size(size, k, step) for size, k, step in zip(x.shape[2:], kernel, stride))
    padded = F.pad(x, (pw, pw, ph, ph, pd, pd)).permute(0, 2, 3, 4, 1)  # (N, D + 2pd, H + 2ph, W + 2pw, C_in)
    taps = [
        padded[:, a : a + sd * (od - 1) + 1 : sd, b : b + sh * (oh - 1) + 1 : sh, c : c + sw * (ow - 1) + 1 : sw]
        for a in range(kernel[0])
        for b in range(kernel[1])
        for c in range(kernel[2])
    ]
    rows = torch.stack(taps, dim=4).reshape(n * od * oh * ow, -1)  # (N·P, T·C_in), tap-major
    matrix = weight.permute(0, 2, 3, 4, 1).reshape(weight.shape[0], -1)  # (C_out, T·C_in)
    y = rows @ matrix.t() if bias is None else torch.addmm(bias, rows, matrix.t())
    return y.view(n, od, oh, ow, -1).permute(0, 4, 1, 2, 3)


def direct_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether to call oneDNN's conv of ``x`` directly (``torch.mkldnn_convolution``): float32 on the CPU, oneDNN
    enabled, not while tracing or exporting (those graphs keep ``conv3d``). Where PyTorch itself picks oneDNN, which is
    every conv of a training step at batch 2 or more on 2 threads, the call is the one it would make.

    PyTorch runs a CPU conv by its own reference kernel, which returns NCDHW, in two cases (``ConvParams::use_mkldnn``):
    one sample with at most 20,480 values in its (N, C, D, H) dims, and, on one thread, a kernel of 1 along H and W
    with fewer than 16 samples. The first is a network's stem (one sample of 1-3 channels), DenseNet3D's 3x3x3 convs
    from 8³ down, UNet3D's from 16³ down and every 3x3x3 conv of ResNet3D's stages on a 16 x 32² clip, in the batch of
    one that psc-search times as its latency objective; the second the fixed 1x1x1 convs (DenseNet3D's transitions,
    sides and head) of a single-threaded step (``OMP_NUM_THREADS=1``). A DenseNet3D's stem output is a piece of every
    layer input of its first block, and a transition's output of the next block's, so those layers then concatenated
    their inputs and ran PyTorch's unfused BatchNorm and ReLU. With the direct call the latency objective was 1.3-2.4x
    faster for DenseNet3D's presets, up to 2.1x for the other backbones' (docs/benchmarks/ops.md, fourteenth
    session)."""
    return (
        x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
        and not torch.is_autocast_enabled("cpu")  # autocast casts ``conv3d``'s inputs, not this call's
        and not tracing()
    )


def folds(kernel_depth: int, stride_depth: int) -> bool:
    """Whether the ``folded`` implementation runs a conv of this depth kernel and stride as 2D."""
    return kernel_depth == 1 and stride_depth == 1


def has_folding_conv(spec: Op) -> bool:
    return any(folds(node.conv.kernel[0], node.conv.stride[0]) for node in spec.graph().nodes)


def has_depthwise_conv(spec: Op) -> bool:
    """Whether some conv of ``spec`` is depthwise (groups = in = out channels, no bias)."""
    return any(
        node.conv.groups == node.conv.in_channels == node.conv.out_channels and not node.conv.bias
        for node in spec.graph().nodes
    )


def thin_grouped(layer: nn.Conv3d) -> bool:
    """Whether ``layer`` is a grouped (not depthwise) 3x3x3 conv the tap-conv kernel runs: stride 1, 'same'
    padding, no bias, fewer than ``THIN_GROUP`` output channels a group."""
    groups = layer.groups
    return (
        1 < groups
        and not groups == layer.in_channels == layer.out_channels
        and layer.out_channels // groups < THIN_GROUP
        and tuple(layer.kernel_size) == (3, 3, 3)
        and tuple(layer.stride) == (1, 1, 1)
        and tuple(layer.padding) == (1, 1, 1)
        and layer.bias is None
    )


def training_step(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a backward may follow (grad mode on, ``x`` or ``weight`` requiring grad), outside tracing and export:
    only then does the depthwise op (whose forward is oneDNN's anyway) run, so inference, TorchScript and ONNX graphs
    hold plain convolutions."""
    if not torch.is_grad_enabled() or not (x.requires_grad or weight.requires_grad):
        return False
    return not tracing()


def tracing() -> bool:
    """Whether TorchScript tracing, ``torch.compile`` or ``torch.export`` is recording the forward: those graphs
    hold only PyTorch's own ops, so psc-nas's C++ kernels stay out of them."""
    exporting = getattr(torch.compiler, "is_exporting", lambda: False)
    return torch.jit.is_tracing() or torch.compiler.is_compiling() or exporting()


@register_flop_formula(torch.ops.aten.mkldnn_convolution)
def _onednn_conv_flops(
    x_shape: Sequence[int], w_shape: Sequence[int], *args: Any, out_shape: Sequence[int], **kwargs: Any
) -> int:
    """``FlopCounterMode`` counts the direct call (``direct_onednn``) as it counts ``conv3d``."""
    return conv_flop_count(list(x_shape), list(w_shape), list(out_shape))
