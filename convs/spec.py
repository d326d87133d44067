"""Variant specs: `NAME[:OPTION=VALUE,...]` strings and named aliases for the thesis' rows, parsed and checked."""

from __future__ import annotations

import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

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

SkipPredicate = Callable[[str, nn.Conv2d], bool]


def skip_7x7(name: str, conv: nn.Conv2d) -> bool:
    """Leave 7x7 convs plain (the ResNet stem): the thesis' Edge_no7 row."""
    return conv.kernel_size == (7, 7)


# alias -> the spec it stands for. Names are the thesis' rows, lower case; eq. numbers for gated's two placements.
ALIASES: dict[str, str] = {
    "edge_no7": "edge",
    "partial_1ch": "partial:multi_channel=false",
    "partial_mc": "partial:multi_channel=true",
    "gated_311": "gated:norm=inside",
    "gated_312": "gated:norm=outside",
}
# alias -> what it means and where the thesis reports it.
ALIAS_MEANINGS: dict[str, str] = {
    "edge_no7": "edge everywhere except 7x7 convs (the stem stays zero padding): tables 4.1/4.2 'Edge_no7'",
    "partial_1ch": "partial conv with a single-channel hole mask: tables 4.5/4.6 'Partial_1ch'",
    "partial_mc": "partial conv with a per-channel (multi-channel) hole mask: tables 4.5/4.6 'Partial'",
    "gated_311": "gated conv, BatchNorm and activation inside the layer (eq. 3.11): tables 4.1/4.2, 4.5/4.6 'Gated'",
    "gated_312": "gated conv, BatchNorm and activation after the gate (eq. 3.12): tables 4.3/4.4 'WN38_gated'",
}
# alias -> convs it leaves plain, beyond what its spec says.
ALIAS_SKIPS: dict[str, SkipPredicate] = {"edge_no7": skip_7x7}

USAGE = "A variant spec is NAME[:OPTION=VALUE[,OPTION=VALUE...]], e.g. 'gated:norm=inside' or 'edge_no7:start=random'."
TRUE, FALSE = ("true", "1"), ("false", "0")


@dataclass(frozen=True)
class VariantSpec:
    """A parsed variant spec: which layer, with which `convert` options, leaving which convs plain."""

    spec: str  # the string as given (an alias stays an alias): the row label everywhere
    base: str  # key of VARIANTS, e.g. "gated"
    options: dict[str, Any]  # parsed and checked `convert` options, e.g. {"norm": "inside"}
    skip: SkipPredicate | None = None  # convs the spec leaves plain, e.g. edge_no7's 7x7 stem

    @property
    def layer(self) -> type[nn.Conv2d]:
        """The layer class of `base`."""
        return VARIANTS[self.base]

    def convert_options(self) -> list[str]:
        """Options that the base variant accepts in `convert` (empty for zero)."""
        return _accepted_options(self.base)


def parse_variant(spec: str) -> VariantSpec:
    """Parse and check a variant spec: a name of `VARIANTS` or `ALIASES`, then optionally `:OPTION=VALUE,...`.

    Values are read by the type of the option in the variant's `from_conv` signature: bool as true/false/1/0,
    int, float, and str literals such as norm's outside/inside. Options that hold objects (gated's `activation`)
    cannot be written in a spec; pass them to `convert` as keywords. Options after an alias add to the alias's
    own; setting one of them to another value is an error.

    Args:
        spec: e.g. "edge", "gated:norm=inside", "partial:multi_channel=true", "edge_no7", "gated_311:start=random".

    Returns:
        The spec as given, its base variant, the parsed options and, for an alias that has one, its skip rule.

    Raises:
        ValueError: an unknown name (the message lists the variants and aliases), an unknown option or a value the
            option does not accept (the message lists the variant's options and their values), or a malformed spec.

    Example:
        >>> import convs
        >>> convs.parse_variant("gated:norm=inside,open_logit=2")
        VariantSpec(spec='gated:norm=inside,open_logit=2', base='gated', options={'norm': 'inside', 'open_logit': 2.0}, skip=None)
        >>> alias = convs.parse_variant("edge_no7")
        >>> alias.base, alias.options, alias.skip.__name__
        ('edge', {}, 'skip_7x7')
        >>> convs.parse_variant("partial_1ch").options
        {'multi_channel': False}
        >>> convs.parse_variant("gated:norm=middle")
        Traceback (most recent call last):
            ...
        ValueError: Invalid value 'middle' for option norm of gated in variant spec 'gated:norm=middle'; norm accepts outside|inside. gated accepts: norm=outside|inside, mask_channel=true|false, open_logit=<float>, start=copy|random (activation only as a keyword of convert).
    """  # noqa: E501
    if not isinstance(spec, str):
        raise TypeError(f"a variant spec must be a str such as 'gated:norm=inside', got {type(spec).__name__}")
    name, has_options, text = spec.partition(":")
    name = name.strip()
    if name in ALIASES:
        target = parse_variant(ALIASES[name])
        base, options, skip = target.base, dict(target.options), ALIAS_SKIPS.get(name, target.skip)
    elif name in VARIANTS:
        base, options, skip = name, {}, None
    else:
        raise ValueError(unknown_variant_message(name))
    if has_options:
        for option, value in _parse_options(spec, base, text).items():
            if option in options and options[option] != value:
                raise ValueError(
                    f"Variant spec {spec!r} sets {option}={_format(value)}, but {name} already means "
                    f"{option}={_format(options[option])} ({name} = {ALIASES[name]!r}). Use {ALIASES[name]!r} "
                    "with the options you want instead."
                )
            options[option] = value
    return VariantSpec(spec, base, options, skip)


def get(spec: str) -> type[nn.Conv2d]:
    """The layer class of a variant spec: `get("gated")`, `get("gated:norm=inside")` and `get("gated_311")` alike.

    Raises:
        ValueError: as `parse_variant`.
    """
    return VARIANTS[parse_variant(spec).base]


def unknown_variant_message(name: str) -> str:
    """The error text for a name that is neither a variant nor an alias: it lists both."""
    aliases = ", ".join(f"{alias} (= {ALIASES[alias]!r}{_skip_note(alias)})" for alias in sorted(ALIASES))
    return f"Unknown conv variant {name!r}. Known variants: {', '.join(sorted(VARIANTS))}; aliases: {aliases}. {USAGE}"


def _skip_note(alias: str) -> str:
    skip = ALIAS_SKIPS.get(alias)
    return "" if skip is None else f" with skip={skip.__name__}"


def _accepted_options(base: str) -> list[str]:
    cls = VARIANTS[base]
    return [] if cls is nn.Conv2d else cls.convert_options()


def _option_types(base: str) -> dict[str, Any]:
    """Option -> its annotation in `from_conv` (typing.Any where there is none: not writable in a spec)."""
    options = _accepted_options(base)
    if not options:
        return {}
    hints = typing.get_type_hints(VARIANTS[base].from_conv)
    return {option: hints.get(option, Any) for option in options}


def _parse_options(spec: str, base: str, text: str) -> dict[str, Any]:
    types_ = _option_types(base)
    parsed: dict[str, Any] = {}
    for item in text.split(","):
        option, has_value, value_text = (part.strip() for part in item.partition("="))
        if not option:
            raise ValueError(f"Empty option in variant spec {spec!r}. {_options_help(base, types_)} {USAGE}")
        if option not in types_:
            raise ValueError(f"Unknown option {option!r} in variant spec {spec!r}. {_options_help(base, types_)}")
        accepted = _accepted_values(types_[option])
        if accepted is None:
            raise ValueError(
                f"Option {option!r} of {base} cannot be written in a variant spec ({spec!r}): it takes "
                f"{_type_name(types_[option])}. Pass it to convert as a keyword: "
                f"convert(model, {base!r}, {option}=...). {_options_help(base, types_)}"
            )
        if not has_value or not value_text:
            raise ValueError(
                f"Option {option!r} in variant spec {spec!r} has no value: write {option}=VALUE with VALUE one of "
                f"{accepted}, e.g. '{base}:{option}={accepted.split('|')[0].strip('<>')}'. "
                f"{_options_help(base, types_)}"
            )
        value = _parse_value(types_[option], value_text)
        if value is _INVALID:
            raise ValueError(
                f"Invalid value {value_text!r} for option {option} of {base} in variant spec {spec!r}; {option} "
                f"accepts {accepted}. {_options_help(base, types_)}"
            )
        if option in parsed and parsed[option] != value:
            raise ValueError(
                f"Variant spec {spec!r} sets {option} twice, to {_format(parsed[option])} and {_format(value)}; "
                "give each option once."
            )
        parsed[option] = value
    return parsed


_INVALID = object()


def _optional_of(hint: Any) -> Any:
    """`X` for `X | None` (and Optional[X]), else `hint` itself."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def _accepted_values(hint: Any) -> str | None:
    """The values a spec may give an option of this type, for messages; None if a spec cannot write it."""
    hint = _optional_of(hint)
    if typing.get_origin(hint) is Literal:
        return "|".join(str(arg) for arg in typing.get_args(hint))
    return {bool: "true|false", int: "<int>", float: "<float>", str: "<text>"}.get(hint)


def _parse_value(hint: Any, text: str) -> Any:
    """`text` read as the option's type, or _INVALID."""
    hint = _optional_of(hint)
    if typing.get_origin(hint) is Literal:
        return next((arg for arg in typing.get_args(hint) if str(arg) == text), _INVALID)
    if hint is bool:
        lowered = text.lower()
        return True if lowered in TRUE else False if lowered in FALSE else _INVALID
    if hint is str:
        return text
    try:
        return hint(text)  # int or float
    except ValueError:
        return _INVALID


def _options_help(base: str, types_: dict[str, Any]) -> str:
    if not types_:
        return f"{base} accepts no options."
    writable = [f"{option}={values}" for option in types_ if (values := _accepted_values(types_[option])) is not None]
    objects = [option for option in types_ if _accepted_values(types_[option]) is None]
    tail = f" ({', '.join(objects)} only as a keyword of convert)" if objects else ""
    return f"{base} accepts: {', '.join(writable)}{tail}."


def _type_name(hint: Any) -> str:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return " | ".join(_type_name(arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return "None"
    if not hasattr(hint, "__qualname__"):
        return str(hint)
    prefix = "nn." if hint.__module__.startswith("torch.nn") else ""
    return prefix + hint.__qualname__


def _format(value: Any) -> str:
    """A value as a spec writes it: true/false for bools, the plain text otherwise."""
    return str(value).lower() if isinstance(value, bool) else str(value)
