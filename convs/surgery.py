"""Model surgery: put a variant in place of every plain nn.Conv2d of any model."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Collection

from torch import nn

from .graph import relu_after_bn
from .policy import ConvReplacement, ConvSite
from .spec import VariantSpec, parse_variant

log = logging.getLogger(__name__)

SkipRule = Callable[[str, nn.Conv2d], bool] | Collection[str]


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
    registered right after a conv in the same parent moves into the gated layer, an nn.Identity in its place,
    and the layer's activation is the one the model applies right after that BatchNorm: `convert` traces the
    model with torch.fx (only then) and finds ReLU where the BatchNorm's only user is a ReLU, the identity
    elsewhere (before a residual addition). The model keeps its own ReLU (relu(relu(x) * s) = relu(x) * s for a
    gate s > 0), so the converted model computes its source's function. A model torch.fx cannot trace gets the
    identity in every layer, with a warning: still exact, but eq. 3.11 without its activation.

    Args:
        model: the model to change in place (not wrapped in DDP or DataParallel).
        variant: a variant spec (see `parse_variant`): a name in `VARIANTS` or `ALIASES`, optionally with
            options, e.g. "gated:norm=inside" or "edge_no7"; "zero" is the plain conv, so it replaces nothing and
            takes no options.
        skip: module names (as in `named_modules`) or a predicate `(name, conv) -> bool` of convs to keep; it
            adds to an alias's own (edge_no7 keeps 7x7 convs): a conv is kept if either says so.
        **options: the variant's `convert_options()`: `multi_channel` for partial; `norm`, `activation`,
            `mask_channel`, `open_logit`, `start` for gated and affine; `start` for edge. They add to the spec's
            options; giving one in both with different values is an error.

    Returns:
        The number of distinct convs replaced (0, with a warning, when there was none left to replace).

    Raises:
        ValueError: unknown variant, a malformed spec, or an option set twice to different values. TypeError:
            unknown option keyword, a str for `skip`, or a DDP-wrapped model.

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
        >>> model[0].act  # the ReLU that the model applies after that BatchNorm (which stays in the model too)
        ReLU()
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 7, padding=3), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))
        >>> convs.convert(model, "edge_no7:start=random")  # a spec string: an alias with an option
        1
        >>> [type(m).__name__ for m in model]
        ['Conv2d', 'ReLU', 'EdgeConv2d']
    """
    if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
        raise TypeError(
            f"convert() got a model wrapped in {type(model).__name__}: its parameters are already registered for "
            "gradient sync. Convert the bare model first, then wrap it: convert(model, ...); model = DDP(model)."
        )
    parsed = parse_variant(variant)
    cls = parsed.layer
    if cls is nn.Conv2d:
        if options:
            raise TypeError(f"variant 'zero' takes no options, got {sorted(options)}")
        return 0  # plain nn.Conv2d already is zero padding
    _check_options(parsed, cls, options)
    options = _merged_options(parsed, options)
    should_skip = _skip_rule(skip, parsed.skip)
    relu_bns = _relu_after_bn(model, variant) if cls.needs_activation_after_bn(**options) else None
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
            site = ConvSite(
                name,
                module,
                following=next_module,
                first=not replaced,
                activation_after_bn=_activation_after_bn(relu_bns, module, next_module),
            )
            changes = cls.replacements(site, **options)
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


def _check_options(parsed: VariantSpec, cls: type[ConvReplacement], options: dict) -> None:
    accepted = cls.convert_options()
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(
            f"convert(..., {parsed.spec!r}) got unknown option(s) {unknown}; "
            f"{parsed.base} accepts {accepted or 'no options'} (and skip=...)"
        )


def _merged_options(parsed: VariantSpec, options: dict) -> dict:
    """The spec's options and the keyword ones together; the same option with two values is an error."""
    for option, value in options.items():
        if option in parsed.options and not _same(parsed.options[option], value):
            raise ValueError(
                f"convert(model, {parsed.spec!r}, {option}={value!r}): the spec already sets "
                f"{option}={parsed.options[option]!r}. Give each option once, in the spec or as a keyword."
            )
    return {**parsed.options, **options}


def _same(a: object, b: object) -> bool:
    return a is b or bool(a == b)  # 3 and 3.0 are the same open_logit; modules compare by identity


def _skip_rule(
    skip: SkipRule | None, spec_skip: Callable[[str, nn.Conv2d], bool] | None = None
) -> Callable[[str, nn.Conv2d], bool]:
    """One predicate: keep a conv if the user's `skip` or the spec's own rule (an alias's) says so."""
    if isinstance(skip, str):
        raise TypeError("skip must be a collection of module names or a predicate (name, conv) -> bool, not a str")
    if skip is None or callable(skip):
        user = skip
    else:
        names = set(skip)
        user = lambda name, conv: name in names  # noqa: E731
    rules = [rule for rule in (spec_skip, user) if rule is not None]
    return lambda name, conv: any(rule(name, conv) for rule in rules)


def _relu_after_bn(model: nn.Module, variant: str) -> dict[nn.Conv2d, nn.BatchNorm2d]:
    """`graph.relu_after_bn(model)`, or {} with a warning when torch.fx cannot trace the model."""
    try:
        return relu_after_bn(model)
    except Exception as error:  # noqa: BLE001 (torch.fx raises many types; every one means "no trace")
        warnings.warn(
            f"convert(model, {variant!r}) could not trace the model with torch.fx to find the activation after each "
            f"BatchNorm ({type(error).__name__}: {error}); every eq. 3.11 layer gets the identity as its activation "
            "and the model keeps its own (the converted model still computes the source's function). Pass "
            "activation=nn.ReLU() to put a ReLU in every layer instead.",
            stacklevel=3,
        )
        return {}


def _activation_after_bn(
    relu_bns: dict[nn.Conv2d, nn.BatchNorm2d] | None, conv: nn.Conv2d, following: nn.Module | None
) -> nn.Module | None:
    """ConvSite.activation_after_bn: None when not looked up; ReLU where the trace found `following` -> ReLU."""
    if relu_bns is None:
        return None
    return nn.ReLU() if following is not None and relu_bns.get(conv) is following else nn.Identity()
