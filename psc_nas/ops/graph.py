"""An op as a small graph of ``ConvSpec`` nodes: the one description its cost and its modules derive from.

Each node is one conv that reads the block input or an earlier node's output, through a ReLU
where the family says; the op's output concatenates chosen nodes on channels. Parallel streams
(PmSCn, CAKES, CSN) are chains from the input; a GhostNet-style conv is a primary conv plus a
cheap conv that reads the primary's output:

    x ─ node 0: conv ─┬───────────────────────────┐
                      └─ ReLU ─ node 1: dw conv ───┴─ concat(0, 1) ─► y

``GraphConv`` is the reference module of any graph: one plain ``nn.Conv3d`` per node, NCDHW.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from psc_nas.costs import Cost, Spatial
from psc_nas.ops._conv import ConvSpec

if TYPE_CHECKING:
    from psc_nas.ops.base import Op

INPUT = -1  # a node's source: the block input


@dataclass(frozen=True)
class Node:
    conv: ConvSpec
    source: int = INPUT  # INPUT or the index of an earlier node
    relu: bool = False  # the conv reads ReLU(source)


@dataclass(frozen=True)
class ConvGraph:
    """Nodes in computation order; ``outputs`` lists the nodes concatenated into the op's output."""

    nodes: tuple[Node, ...]
    outputs: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "nodes", tuple(self.nodes))
        object.__setattr__(self, "outputs", tuple(self.outputs))
        if not self.nodes or not self.outputs:
            raise ValueError("a conv graph needs at least one node and one output")
        for index, node in enumerate(self.nodes):
            if not INPUT <= node.source < index:
                raise ValueError(f"node {index} reads node {node.source}: a node reads the input or an earlier node")
            if node.conv.in_channels != self.channels_into(index):
                raise ValueError(
                    f"node {index} takes {node.conv.in_channels} channels, its source gives {self.channels_into(index)}"
                )
        if len(set(self.outputs)) != len(self.outputs) or not all(0 <= i < len(self.nodes) for i in self.outputs):
            raise ValueError(f"outputs must be distinct node indices, got {list(self.outputs)}")

    @classmethod
    def streams(cls, streams: Sequence[Sequence[ConvSpec]], *, relu_between: bool = False) -> ConvGraph:
        """Parallel chains of convs from the input, their last convs concatenated in order."""
        nodes: list[Node] = []
        outputs = []
        for stream in streams:
            for position, conv in enumerate(stream):
                source = len(nodes) - 1 if position else INPUT
                nodes.append(Node(conv, source, relu=relu_between and position > 0))
            outputs.append(len(nodes) - 1)
        return cls(tuple(nodes), tuple(outputs))

    @property
    def in_channels(self) -> int:
        return next(node.conv.in_channels for node in self.nodes if node.source == INPUT)

    @property
    def out_channels(self) -> int:
        return sum(self.nodes[index].conv.out_channels for index in self.outputs)

    def channels_into(self, index: int) -> int:
        source = self.nodes[index].source
        return self.in_channels if source == INPUT else self.nodes[source].conv.out_channels

    def node_costs(self, spatial: Spatial) -> list[tuple[Cost, Spatial]]:
        """Each node's exact params and MACs and its output's spatial size, in node order."""
        costs: list[tuple[Cost, Spatial]] = []
        for node in self.nodes:
            costs.append(node.conv.cost(tuple(spatial) if node.source == INPUT else costs[node.source][1]))
        return costs

    def cost_and_shape(self, spatial: Spatial) -> tuple[Cost, Spatial]:
        """Exact params and MACs of every node, and the output's spatial size."""
        costs = self.node_costs(spatial)
        sizes = {costs[index][1] for index in self.outputs}
        if len(sizes) > 1:
            raise ValueError(f"outputs of spatial sizes {sorted(sizes)} cannot be concatenated")
        return sum((cost for cost, _ in costs), Cost()), sizes.pop()

    def blocked_ratio(self, spatial: Spatial) -> float:
        """MACs oneDNN's per-node convs execute over the analytic cost (``ConvSpec.blocked_share``): 1.0 where every
        node's output channels fill whole blocks of 16, 32/18 for a node of 18."""
        costs = self.node_costs(spatial)
        analytic = sum(cost.macs for cost, _ in costs)
        blocked = sum(cost.macs * node.conv.blocked_share for node, (cost, _) in zip(self.nodes, costs))
        return blocked / analytic if analytic else 1.0

    def path(self, index: int) -> list[ConvSpec]:
        """The convs from the input to node ``index``, in order."""
        convs = []
        while index != INPUT:
            convs.append(self.nodes[index].conv)
            index = self.nodes[index].source
        return convs[::-1]

    def segments(self) -> list[tuple[str, int]]:
        """Per output node: its path named by sub-kernels (``1x3x3×2→3x1x1``) and its channels.

        The dashboard colors channels by this name, so equal sub-kernel paths get equal colors
        whichever family built them (a CAKES ``3x3x3`` channel and a conv3d channel, say).
        """
        return [(path_name(self.path(index)), self.nodes[index].conv.out_channels) for index in self.outputs]


def path_name(convs: Sequence[ConvSpec]) -> str:
    """``1x3x3×2→3x1x1`` (PmSCn n=2), ``1x1x1→dw3x3x3`` (ip-CSN), ``g8 3x3x3`` (grouped)."""
    labels: list[str] = []
    for conv in convs:
        kernel = "x".join(map(str, conv.kernel))
        if conv.groups > 1:
            kernel = ("dw" if conv.groups == conv.in_channels else f"g{conv.groups} ") + kernel
        if labels and labels[-1].split("×")[0] == kernel:
            repeats = int(labels[-1].split("×")[1]) if "×" in labels[-1] else 1
            labels[-1] = f"{kernel}×{repeats + 1}"
        else:
            labels.append(kernel)
    return "→".join(labels)


class GraphConv(nn.Module):
    """Reference implementation of any op described by a ``ConvGraph``: ``nn.Conv3d`` per node, NCDHW.

    ``spec`` is the op the module computes. Subclasses change only how a
    node's conv is computed (``run_conv``), so every implementation has this module's parameters.
    """

    impl = "reference"

    def __init__(self, spec: Op) -> None:
        super().__init__()
        self.spec = spec
        self.graph = spec.graph()
        self.convs = nn.ModuleList(node.conv.build() for node in self.graph.nodes)
        nodes, outputs = self.graph.nodes, set(self.graph.outputs)
        readers = [[k for k, node in enumerate(nodes) if node.source == j] for j in range(len(nodes))]
        # A node value is dropped after its last reader unless it is an output; a ReLU may then
        # overwrite it in place (the memory the sequential streams had before the graph).
        self._drop_after = [
            [j for j in range(len(nodes)) if j not in outputs and readers[j][-1:] == [k]] for k in range(len(nodes))
        ]
        self._relu_inplace = [
            node.source != INPUT and node.source not in outputs and readers[node.source] == [k]
            for k, node in enumerate(nodes)
        ]

    def cost(self, spatial: Spatial) -> Cost:
        return self.spec.cost(spatial)

    def run_conv(self, conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
        return conv(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values: list[torch.Tensor | None] = []
        for index, (node, conv) in enumerate(zip(self.graph.nodes, self.convs)):
            source = x if node.source == INPUT else values[node.source]
            if node.relu:
                source = F.relu(source, inplace=self._relu_inplace[index])
            values.append(self.run_conv(conv, source))
            for dropped in self._drop_after[index]:
                values[dropped] = None
        outputs = [values[index] for index in self.graph.outputs]
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)

    def extra_repr(self) -> str:
        return f"{self.spec}, impl={self.impl}"
