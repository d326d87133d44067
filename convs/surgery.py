"""Model surgery: put a variant in place of every plain nn.Conv2d of any model."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Collection

from torch import nn

from .edge import EdgeConv2d
from .gated import AffineGatedConv2d, GatedConv2d
from .partial import PartialConv2d
from .policy import ConvReplacement, ConvSite

log = logging.getLogger(__name__)

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

    Each conv goes through its variant's policy, `Variant.replacements(site, **options)` (by default
    `Variant.from_conv(conv, **options)`): same geometry, copied weights, and (where the layer's math allows)
    exactly the source's function, so pretrained models convert too. Subclasses of nn.Conv2d, the variants among
    them, are left alone and never descended into, so a second call replaces nothing. A conv registered in
    several places is replaced everywhere by the same layer. Convert before wrapping in DistributedDataParallel:
    DDP has already registered the old parameters.

    gated: the first converted conv (in registration order) takes the mask as an extra input channel unless
    `mask_channel=False` (affine: every layer does); with `norm="inside"` (thesis eq. 3.11) a BatchNorm2d
    registered right after a conv in the same parent moves into the gated layer, an nn.Identity in its place.

    Args:
        model: the model to change in place (not wrapped in DDP or DataParallel).
        variant: a name in `VARIANTS`; "zero" is the plain conv, so it replaces nothing and takes no options.
        skip: module names (as in `named_modules`) or a predicate `(name, conv) -> bool` of convs to keep;
            e.g. the thesis' edge_no7: `skip=lambda name, conv: conv.kernel_size == (7, 7)`.
        **options: the variant's `convert_options()`: `multi_channel` for partial; `norm`, `activation`,
            `mask_channel`, `open_logit` for gated and affine.

    Returns:
        The number of distinct convs replaced (0, with a warning, when there was none left to replace).

    Raises:
        ValueError: unknown variant. TypeError: unknown option, a str for `skip`, or a DDP-wrapped model.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import convs
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
        >>> convs.convert(model, "edge", skip={"3"})
        1
        >>> [type(m).__name__ for m in model]
        ['EdgeConv2d', 'BatchNorm2d', 'ReLU', 'Conv2d']
        >>> model(torch.randn(2, 3, 16, 16)).shape
        torch.Size([2, 4, 16, 16])
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
        >>> convs.convert(model, "gated", norm="inside")  # eq. 3.11: the BatchNorm moves into the layer
        2
        >>> [type(m).__name__ for m in model]
        ['GatedConv2d', 'Identity', 'ReLU', 'GatedConv2d']
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
    # Listed before any change, with duplicates: a module registered twice appears under each of its names.
    entries = list(model.named_modules(remove_duplicate=False))
    modules, following = dict(entries), _next_siblings(entries)
    hidden: set[str] = set()  # never visited: the insides of convs, and neighbours that a policy replaced
    replaced: dict[nn.Module, nn.Module] = {}  # source conv -> replacement: a conv shared by two parents stays shared
    neighbours = 0
    for name, module in entries[1:]:
        parent_name, _, attr = name.rpartition(".")
        if name in hidden or parent_name in hidden:
            hidden.add(name)
            continue
        if isinstance(module, nn.Conv2d):
            hidden.add(name)  # a conv is never descended into, whatever its type
        if type(module) is not nn.Conv2d or should_skip(name, module):
            continue
        parent = modules[parent_name]
        if module not in replaced:
            next_name, next_module = following.get(name, ("", None))
            changes = cls.replacements(ConvSite(name, module, following=next_module, first=not replaced), **options)
            replaced[module] = changes.pop(module)
            log.debug("%s: %s -> %s", name, type(module).__name__, type(replaced[module]).__name__)
            for old, new in changes.items():
                if old is not next_module:
                    raise ValueError(
                        f"{cls.__name__}.replacements may replace only the conv {name!r} and the module right "
                        f"after it, got a {type(old).__name__} as well"
                    )
                setattr(parent, next_name.rpartition(".")[2], new)
                hidden.add(next_name)
                neighbours += 1
                log.debug("%s: %s -> %s", next_name, type(old).__name__, type(new).__name__)
        setattr(parent, attr, replaced[module])
    if not replaced:
        warnings.warn(
            f"convert(model, {variant!r}) replaced nothing: the model has no plain nn.Conv2d left "
            "(already converted, or every one skipped)",
            stacklevel=2,
        )
    log.info(
        "convert(model, %r): replaced %d nn.Conv2d by %s and %d following module(s)",
        variant,
        len(replaced),
        cls.__name__,
        neighbours,
    )
    return len(replaced)


def _next_siblings(entries: list[tuple[str, nn.Module]]) -> dict[str, tuple[str, nn.Module]]:
    """Qualified name -> (name, module) registered right after it in the same parent, from `named_modules` order."""
    latest: dict[str, str] = {}  # parent name -> its child listed last so far (children come in registration order)
    siblings: dict[str, tuple[str, nn.Module]] = {}
    for name, module in entries[1:]:
        parent_name = name.rpartition(".")[0]
        if parent_name in latest:
            siblings[latest[parent_name]] = (name, module)
        latest[parent_name] = name
    return siblings


def _check_options(variant: str, cls: type[ConvReplacement], options: dict) -> None:
    accepted = cls.convert_options()
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
