"""Full 3D convolution: the baseline every other family replaces."""

from __future__ import annotations

from dataclasses import dataclass

from psc_nas.ops._conv import ConvSpec, Triple, triple
from psc_nas.ops.base import OpSpec, Stream, register


@register
@dataclass(frozen=True)
class Conv3dSpec(OpSpec):
    family = "conv3d"

    kernel_size: int | Triple = 3

    def validate(self) -> None:
        try:
            kernel = triple(self.kernel_size, "kernel_size")
        except ValueError as err:
            raise ValueError(f"conv3d: {err}") from None
        if any(k % 2 == 0 for k in kernel):
            raise ValueError(f"conv3d: kernel_size must be odd (1, 3, 5, ...), got {self.kernel_size!r}")
        object.__setattr__(self, "kernel_size", kernel[0] if len(set(kernel)) == 1 else kernel)

    def streams(self) -> tuple[Stream, ...]:
        kernel = triple(self.kernel_size, "kernel_size")
        return ((ConvSpec(self.in_channels, self.out_channels, kernel, self.stride),),)
