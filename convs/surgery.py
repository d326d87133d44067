"""Model surgery: put a variant in place of every plain nn.Conv2d of any model."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Collection

from torch import nn

from .edge import EdgeConv2d
from .gated import AffineGatedConv2d, GatedConv2d
from .partial import PartialConv2d

# name -> layer class. `zero` is plain nn.Conv2d with zero padding: the baseline every variant is compared with.
VARIANTS: dict[str, type[nn.Conv2d]] = {
    "zero": nn.Conv2d,
    "partial": PartialConv2d,
    "gated": GatedConv2d,
    "edge": EdgeConv2d,
    "affine": AffineGatedConv2d,
}

SkipRule = Callable[[str, nn.Conv2d], bool] | Collection[str]


def get(name: str) -> type[nn.Conv2d]:
    """The layer class registered under `name`."""
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(f"Unknown conv variant {name!r}. Known variants: {', '.join(sorted(VARIANTS))}.") from None


def convert(model: nn.Module, variant: str, *, skip: SkipRule | None = None, **options) -> int:
    """Replace the plain nn.Conv2d layers of `model` in place by `variant`; return how many were replaced.

    Each replacement is `Variant.from_conv(conv, **options)`: same geometry, copied weights, and (where the
    layer's math allows) exactly the source's function, so pretrained models convert too. Subclasses of
    nn.Conv2d, the variants among them, are left alone and never descended into, so a second call replaces
    nothing. `skip` is a set of module names (as in `named_modules`) or a predicate `(name, conv) -> bool`;
    e.g. the thesis' edge_no7: `convert(model, "edge", skip=lambda name, c: c.kernel_size == (7, 7))`.

    gated: the first converted conv (in registration order) takes the mask as an extra input channel unless
    `mask_channel=False` (affine: every layer does); with `norm="inside"` (thesis eq. 3.11) a BatchNorm2d
    registered right after a conv in the same parent moves into the gated layer, an nn.Identity in its place.
    Convert before wrapping in DistributedDataParallel: DDP has already registered the old parameters.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
        raise TypeError(
            f"convert() got a model wrapped in {type(model).__name__}: its parameters are already registered for "
            "gradient sync. Convert the bare model first, then wrap it: convert(model, ...); model = DDP(model)."
        )
    cls = get(variant)
    if cls is nn.Conv2d:
        if options:
            raise TypeError(f"variant 'zero' takes no options, got {sorted(options)}")
        return 0  # plain nn.Conv2d already is zero padding
    _check_options(variant, cls, options)
    should_skip = _skip_rule(skip)
    replaced: dict[int, nn.Conv2d] = {}  # id(source) -> replacement: a conv shared by two parents stays shared

    def visit(parent: nn.Module, prefix: str) -> None:
        names = list(parent._modules)
        for i, name in enumerate(names):
            child = parent._modules[name]
            full = f"{prefix}{name}"
            if child is None:
                continue
            if not isinstance(child, nn.Conv2d):
                visit(child, f"{full}.")
                continue
            if type(child) is not nn.Conv2d or should_skip(full, child):
                continue
            if id(child) not in replaced:
                following = parent._modules.get(names[i + 1]) if i + 1 < len(names) else None
                replaced[id(child)] = _build(cls, child, first=not replaced, following=following, options=options)
                if isinstance(replaced[id(child)], GatedConv2d) and replaced[id(child)].norm == "inside":
                    if _absorbable(following, child):
                        parent._modules[names[i + 1]] = nn.Identity()
            parent._modules[name] = replaced[id(child)]

    visit(model, "")
    if not replaced:
        warnings.warn(
            f"convert(model, {variant!r}) replaced nothing: the model has no plain nn.Conv2d left "
            "(already converted, or every one skipped)",
            stacklevel=2,
        )
    return len(replaced)


def _absorbable(module: nn.Module | None, conv: nn.Conv2d) -> bool:
    return isinstance(module, nn.BatchNorm2d) and module.num_features == conv.out_channels


def _build(cls: type[nn.Conv2d], conv: nn.Conv2d, *, first: bool, following: nn.Module | None, options: dict):
    kwargs = dict(options)
    if cls is GatedConv2d or issubclass(cls, GatedConv2d):
        kwargs["mask_channel"] = bool(options.get("mask_channel", True)) and (first or cls.MASK_EVERY_LAYER)
        if options.get("norm") == "inside":
            kwargs["bn"] = following if _absorbable(following, conv) else None
    return cls.from_conv(conv, **kwargs)


def _check_options(variant: str, cls: type[nn.Conv2d], options: dict) -> None:
    accepted = [p for p in inspect.signature(cls.from_conv).parameters if p not in ("conv", "bn")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(
            f"convert(..., {variant!r}) got unknown option(s) {unknown}; "
            f"{variant} accepts {accepted or 'no options'} (and skip=...)"
        )


def _skip_rule(skip: SkipRule | None) -> Callable[[str, nn.Conv2d], bool]:
    if skip is None:
        return lambda name, conv: False
    if callable(skip):
        return skip
    if isinstance(skip, str):
        raise TypeError("skip must be a collection of module names or a predicate (name, conv) -> bool, not a str")
    names = set(skip)
    return lambda name, conv: name in names
