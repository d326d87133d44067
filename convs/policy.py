"""Replacement policy: what `convert` tells a variant about a plain conv, and what the variant replaces in return."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import ClassVar

from torch import nn


@dataclass(frozen=True)
class ConvSite:
    """A plain nn.Conv2d where `convert` found it, with what a policy may need from its neighbours."""

    name: str  # qualified name, as in `model.named_modules()`
    conv: nn.Conv2d
    following: nn.Module | None = None  # the module registered right after `conv` in the same parent, if any
    first: bool = False  # True for the first conv that this `convert` call replaces (registration order)


class ConvReplacement:
    """Mixin of the variants: how `convert` replaces a plain conv by one of them (the default: `from_conv`).

    A variant that needs more than the conv overrides `replacements` (GatedConv2d: the mask channel on the first
    layer only, a following BatchNorm to absorb) and lists in `SITE_ARGUMENTS` the `from_conv` arguments its
    policy fills in from the site, which are therefore not options of `convert`.
    """

    # `from_conv` keyword arguments that `replacements` fills in from the site rather than from the user.
    SITE_ARGUMENTS: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def convert_options(cls) -> list[str]:
        """Options that `convert(model, variant, **options)` accepts: those of `from_conv`, less the site's."""
        parameters = inspect.signature(cls.from_conv).parameters
        return [name for name in parameters if name != "conv" and name not in cls.SITE_ARGUMENTS]

    @classmethod
    def replacements(cls, site: ConvSite, **options) -> dict[nn.Module, nn.Module]:
        """The policy `convert` calls once per distinct plain conv: which modules to replace, and by what.

        Args:
            site: the conv, its qualified name, the module registered right after it and whether it is the first
                conv replaced in this call.
            **options: the user's `convert` options, already checked against `convert_options()`.

        Returns:
            {old module: new module}: the conv (always) and, where the policy absorbs it, `site.following`.
            `convert` installs them in the conv's parent; a conv registered twice gets the same replacement.

        Example:
            >>> import torch
            >>> from torch import nn
            >>> import convs
            >>> conv = nn.Conv2d(3, 8, 3, padding=1)
            >>> changes = convs.EdgeConv2d.replacements(convs.ConvSite("0", conv, first=True))
            >>> [type(new).__name__ for new in changes.values()], conv in changes
            (['EdgeConv2d'], True)
        """
        return {site.conv: cls.from_conv(site.conv, **options)}
