"""Replacement policy: what `convert` tells a variant about a plain conv, and what the variant replaces in return."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

# How `from_conv` starts the filters a variant adds: "copy" reproduces the source conv's function exactly (edge:
# region filters copied; gated: gate open, feature scaled), "random" gives them a fresh layer's default init.
STARTS = ("copy", "random")


def check_start(start: str, owner: str) -> None:
    """Raise unless `start` is one of `STARTS`."""
    if start not in STARTS:
        raise ValueError(
            f"Invalid start {start!r} for {owner}.from_conv. Only 'copy' (the source conv's exact function, the "
            "default) and 'random' (the added filters freshly initialised, as in a new layer) are supported."
        )


@dataclass(frozen=True)
class ConvSite:
    """A plain nn.Conv2d where `convert` found it, with what a policy may need from its neighbours."""

    name: str  # qualified name, as in `model.named_modules()`
    conv: nn.Conv2d
    following: nn.Module | None = None  # the module registered right after `conv` in the same parent, if any
    first: bool = False  # True for the first conv that this `convert` call replaces (registration order)
    # What the model's forward applies to the output of the BatchNorm `following` (if `following` is the BatchNorm
    # that takes the conv's output): nn.ReLU() when its only user is a ReLU, else nn.Identity() (an addition, or
    # anything else). None: not looked up; `convert` looks it up (torch.fx) only for a policy whose
    # `needs_activation_after_bn(**options)` says so.
    activation_after_bn: nn.Module | None = None


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
    def needs_activation_after_bn(cls, **options) -> bool:
        """Whether `replacements` reads `site.activation_after_bn` under these options (then `convert` traces).

        Args:
            **options: the user's `convert` options, already checked against `convert_options()`.

        Returns:
            False here; GatedConv2d: True for norm="inside" without an explicit activation.
        """
        return False

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
