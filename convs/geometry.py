"""Geometry shared by the variants: padding per side, output size per axis, where windows leave the image."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Generic, TypeVar

import torch
from torch import nn

SUPPORTED_PADDING_MODES = ("zeros",)
V = TypeVar("V")


def check_padding_mode(padding_mode: str, owner: str) -> None:
    """Raise if `padding_mode` is not zero padding: the variants define their own border handling."""
    if padding_mode not in SUPPORTED_PADDING_MODES:
        raise ValueError(
            f"{owner} got padding_mode={padding_mode!r}; only padding_mode='zeros' is supported, because the layer "
            "replaces zero padding with its own border handling. Skip this layer in convert(..., skip=...) "
            "or build it with padding_mode='zeros'."
        )


def side_padding(conv: nn.Conv2d) -> tuple[tuple[int, int], tuple[int, int]]:
    """Return ((top, bottom), (left, right)) zero padding of `conv`, resolving 'same' and 'valid' as torch does."""
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0), (0, 0)
        # 'same' (stride 1 only, enforced by nn.Conv2d): torch puts the odd pixel at the end.
        sides = []
        for k, d in zip(conv.kernel_size, conv.dilation, strict=True):
            total = d * (k - 1)
            sides.append((total // 2, total - total // 2))
        return sides[0], sides[1]
    ph, pw = conv.padding
    return (ph, ph), (pw, pw)


@dataclass(frozen=True)
class AxisPlan:
    """Geometry of one axis: which output positions have windows that leave the image.

    `low` output positions at the start have a window reaching below index 0, `high` positions at the end have a
    window reaching past the last pixel (both can overlap on tiny inputs). `valid[i]` counts the kernel taps of
    position i that fall inside the image.
    """

    size: int
    out: int
    kernel: int
    stride: int
    dilation: int
    pad_before: int
    low: int
    high: int
    valid: tuple[int, ...]

    def window(self, start: int, stop: int) -> tuple[int, int, int, int]:
        """Input slice [lo, hi) and zero padding (before, after) that produce outputs [start, stop) with padding 0."""
        first = start * self.stride - self.pad_before
        last = (stop - 1) * self.stride - self.pad_before + (self.kernel - 1) * self.dilation + 1
        lo, hi = min(max(first, 0), self.size), max(min(last, self.size), 0)
        hi = max(hi, lo)
        return lo, hi, lo - first, last - hi

    def taps(self, start: int, stop: int) -> tuple[int, int]:
        """Kernel taps [lo, hi) from the first to the last that reads a pixel of the image (not padding) for some
        output in [start, stop); (0, 0) where every window of the range lies in the padding."""
        inside = [
            j
            for i in range(start, stop)
            for j in range(self.kernel)
            if 0 <= i * self.stride - self.pad_before + j * self.dilation < self.size
        ]
        return (min(inside), max(inside) + 1) if inside else (0, 0)

    @property
    def spans(self) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        """Output ranges [start, stop) whose windows leave the image before it, stay inside, and leave after it.

        A window that leaves both sides (tiny inputs) counts as 'before'; the inside range may be empty.
        """
        head = min(self.low, self.out)
        tail = max(self.out - self.high, head)
        return (0, head), (head, tail), (tail, self.out)

    @property
    def touches_padding(self) -> bool:
        return self.low > 0 or self.high > 0


@lru_cache(maxsize=4096)
def axis_plan(size: int, kernel: int, stride: int, dilation: int, pad_before: int, pad_after: int) -> AxisPlan:
    """Plan one axis; pure Python on ints, so it is exact, cheap and cached process-wide."""
    out = (size + pad_before + pad_after - dilation * (kernel - 1) - 1) // stride + 1
    if out <= 0:
        raise ValueError(
            f"input of size {size} is too small for kernel {kernel} with dilation {dilation} and padding "
            f"({pad_before}, {pad_after}): the output would be empty"
        )
    valid, low, high = [], 0, 0
    for i in range(out):
        first = i * stride - pad_before
        last = first + (kernel - 1) * dilation
        valid.append(sum(1 for j in range(kernel) if 0 <= first + j * dilation < size))
        low += first < 0
        high += last >= size
    return AxisPlan(size, out, kernel, stride, dilation, pad_before, low, high, tuple(valid))


def conv_plans(conv: nn.Conv2d, height: int, width: int) -> tuple[AxisPlan, AxisPlan]:
    """Row and column plans of `conv` applied to an input of the given height and width."""
    (pt, pb), (pl, pr) = side_padding(conv)
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    # Under torch.compile the plan is traced once per input shape anyway; skip the cache wrapper dynamo warns on.
    plan = axis_plan.__wrapped__ if torch.compiler.is_compiling() else axis_plan
    return plan(height, kh, sh, dh, pt, pb), plan(width, kw, sw, dw, pl, pr)


class SizeCache(Generic[V]):
    """A layer's values per input size (or any hashable key), least recently used first out past `maxsize`.

    While torch.compile traces, values are computed afresh and the cache is left alone: the graph is specialised
    on the input shape anyway, and reading or writing a Python dict would only add guards and side effects.
    """

    def __init__(self, maxsize: int = 64) -> None:
        self.maxsize = maxsize
        self._values: OrderedDict[Hashable, V] = OrderedDict()

    def lookup(self, key: Hashable, compute: Callable[[], V]) -> V:
        """The value stored under `key`; on a miss, `compute()` stored under it."""
        if torch.compiler.is_compiling():
            return compute()
        if key in self._values:
            self._values.move_to_end(key)
            return self._values[key]
        value = self._values[key] = compute()
        if len(self._values) > self.maxsize:
            self._values.popitem(last=False)
        return value

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


def conv_kwargs(conv: nn.Conv2d) -> dict:
    """Constructor arguments that reproduce the geometry of `conv`."""
    return dict(
        in_channels=conv.in_channels,
        out_channels=conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )


def copy_conv_params(src: nn.Conv2d, dst: nn.Conv2d) -> None:
    """Copy weight and bias of `src` into `dst` and carry over train/eval mode and requires_grad."""
    with torch.no_grad():
        dst.weight.copy_(src.weight)
        if src.bias is not None:
            dst.bias.copy_(src.bias)
    dst.weight.requires_grad_(src.weight.requires_grad)
    if src.bias is not None:
        dst.bias.requires_grad_(src.bias.requires_grad)
    dst.train(src.training)
