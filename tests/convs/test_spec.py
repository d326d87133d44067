"""Variant specs and aliases: parsing, the errors that name the valid choices, and what each converts."""

import pytest
import torch
import torchvision.models as tvm
from torch import nn

import convs

# spec -> (base, parsed options) for each alias and a few written-out specs
EXPECTED = {
    "edge_no7": ("edge", {}),
    "partial_1ch": ("partial", {"multi_channel": False}),
    "partial_mc": ("partial", {"multi_channel": True}),
    "gated_311": ("gated", {"norm": "inside"}),
    "gated_312": ("gated", {"norm": "outside"}),
    "gated:norm=inside": ("gated", {"norm": "inside"}),
    "partial:multi_channel=true": ("partial", {"multi_channel": True}),
    "edge:start=random": ("edge", {"start": "random"}),
    "affine:norm=inside,mask_channel=0,open_logit=2.5": (
        "affine",
        {"norm": "inside", "mask_channel": False, "open_logit": 2.5},
    ),
    " gated : norm = inside , start = random ": ("gated", {"norm": "inside", "start": "random"}),
    "edge_no7:start=random": ("edge", {"start": "random"}),
    "gated_311:start=random,norm=inside": ("gated", {"norm": "inside", "start": "random"}),
}
# name -> (spec, module name -> expected attribute values) checked on a converted ResNet50
RESNET50_CONVERSIONS = {
    **{name: (name, {}) for name in sorted(convs.VARIANTS) if name != "zero"},
    "edge_no7": ("edge_no7", {}),
    "partial_1ch": ("partial_1ch", {"layer1.0.conv1": {"multi_channel": False}}),
    "partial_mc": ("partial_mc", {"layer1.0.conv1": {"multi_channel": True}}),
    "gated_311": ("gated_311", {"layer1.0.conv1": {"norm": "inside"}}),
    "gated_312": ("gated_312", {"layer1.0.conv1": {"norm": "outside"}}),
    "affine:norm=inside": ("affine:norm=inside", {"conv1": {"norm": "inside", "mask_channel": True}}),
    "gated:mask_channel=false": ("gated:mask_channel=false", {"conv1": {"mask_channel": False}}),
}


def test_every_alias_is_documented_and_parses_to_a_variant():
    assert set(convs.ALIASES) == set(convs.ALIAS_MEANINGS)
    assert not set(convs.ALIASES) & set(convs.VARIANTS), "an alias must not shadow a variant"
    for alias, spec in convs.ALIASES.items():
        parsed = convs.parse_variant(alias)
        assert parsed.spec == alias and parsed.base in convs.VARIANTS
        assert parsed.options == convs.parse_variant(spec).options
        assert convs.get(alias) is convs.get(spec) is convs.VARIANTS[parsed.base]


@pytest.mark.parametrize("spec", sorted(EXPECTED))
def test_spec_parses_to_base_and_typed_options(spec):
    parsed = convs.parse_variant(spec)
    assert (parsed.base, parsed.options) == EXPECTED[spec]
    assert parsed.spec == spec, "the spec stays as given: it is the row label"
    assert {type(v) for v in parsed.options.values()} <= {str, bool, float}
    assert set(parsed.options) <= set(parsed.convert_options())


def test_plain_names_and_convert_options():
    for name, cls in convs.VARIANTS.items():
        parsed = convs.parse_variant(name)
        assert parsed == convs.VariantSpec(name, name, {}) and parsed.layer is cls
    assert convs.parse_variant("zero").convert_options() == []
    assert convs.parse_variant("edge_no7").convert_options() == ["start"]
    assert convs.parse_variant("gated_311").convert_options() == convs.GatedConv2d.convert_options()


@pytest.mark.parametrize(("text", "value"), [("true", True), ("1", True), ("False", False), ("0", False)])
def test_bool_values(text, value):
    assert convs.parse_variant(f"partial:multi_channel={text}").options == {"multi_channel": value}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("gated:norm=middle", r"Invalid value 'middle' for option norm of gated.*norm accepts outside\|inside"),
        ("gated:colour=red", r"Unknown option 'colour'.*gated accepts: norm=outside\|inside, mask_channel=true\|false"),
        ("edgy", r"Unknown conv variant 'edgy'. Known variants: affine, edge, gated, partial, zero; aliases: edge_no7"),
        ("gated:norm", r"Option 'norm' in variant spec 'gated:norm' has no value.*outside\|inside"),
        ("gated:norm=", r"Option 'norm' .* has no value: write norm=VALUE"),
        ("gated:", r"Empty option in variant spec 'gated:'.*gated accepts: norm="),
        ("gated:start=fresh", r"start accepts copy\|random"),
        ("gated:open_logit=open", r"open_logit accepts <float>"),
        ("partial:multi_channel=maybe", r"multi_channel accepts true\|false"),
        ("edge:multi_channel=true", r"Unknown option 'multi_channel'.*edge accepts: start=copy\|random\."),
        ("zero:start=random", r"Unknown option 'start'.*zero accepts no options"),
        ("gated:activation=relu", r"'activation' of gated cannot be written.*nn.Module.*activation=\.\.\."),
        ("gated:norm=inside,norm=outside", r"sets norm twice, to inside and outside"),
        ("gated_311:norm=outside", r"gated_311 already means norm=inside \(gated_311 = 'gated:norm=inside'\)"),
        ("partial_1ch:multi_channel=1", r"partial_1ch already means multi_channel=false"),
    ],
)
def test_bad_specs_name_the_valid_choices(spec, message):
    with pytest.raises(ValueError, match=message):
        convs.parse_variant(spec)
    with pytest.raises(ValueError, match=message):
        convs.convert(nn.Sequential(nn.Conv2d(3, 3, 3, padding=1)), spec)


def test_unknown_names_list_variants_and_aliases():
    with pytest.raises(
        ValueError, match=r"aliases: edge_no7 \(= 'edge' with skip=skip_7x7\), gated_311 \(= 'gated:norm=inside'\)"
    ):
        convs.get("edgy")
    with pytest.raises(TypeError, match="must be a str"):
        convs.parse_variant(None)


def test_same_option_twice_with_the_same_value_is_fine():
    assert convs.parse_variant("gated:norm=inside,norm=inside").options == {"norm": "inside"}
    assert convs.parse_variant("gated_311:norm=inside").options == {"norm": "inside"}


@pytest.mark.parametrize("name", sorted(RESNET50_CONVERSIONS))
def test_alias_and_spec_convert_the_expected_convs(name):
    spec, attributes = RESNET50_CONVERSIONS[name]
    model = tvm.resnet50()
    expected = 52 if spec.startswith("edge_no7") else 53
    assert convs.convert(model, spec) == expected
    cls = convs.get(spec)
    assert sum(isinstance(m, cls) for m in model.modules()) == expected
    if spec == "edge_no7":
        assert type(model.conv1) is nn.Conv2d
        assert not any(type(m) is nn.Conv2d for n, m in model.named_modules() if n != "conv1")
    else:
        assert not any(type(m) is nn.Conv2d for m in model.modules())
    for module_name, values in attributes.items():
        layer = model.get_submodule(module_name)
        assert {key: getattr(layer, key) for key in values} == values


def test_spec_options_merge_with_keyword_options():
    model = tvm.resnet18()
    assert convs.convert(model, "gated:norm=inside", mask_channel=False, start="copy") == 20
    assert model.conv1.norm == "inside" and not model.conv1.mask_channel
    model = tvm.resnet18()
    assert convs.convert(model, "gated_311", norm="inside") == 20  # the same value twice is fine
    with pytest.raises(ValueError, match=r"the spec already sets norm='inside'. Give each option once"):
        convs.convert(tvm.resnet18(), "gated_311", norm="outside")
    with pytest.raises(ValueError, match=r"already sets multi_channel=False"):
        convs.convert(tvm.resnet18(), "partial:multi_channel=false", multi_channel=True)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['norm'\]; edge accepts \['start'\]"):
        convs.convert(tvm.resnet18(), "edge_no7", norm="inside")


def test_alias_skip_and_explicit_skip_combine():
    model = tvm.resnet18()
    assert convs.convert(model, "edge_no7", skip={"layer1.0.conv1"}) == 18
    assert type(model.conv1) is nn.Conv2d and type(model.layer1[0].conv1) is nn.Conv2d
    model = tvm.resnet18()
    assert convs.convert(model, "edge_no7", skip=lambda name, conv: conv.kernel_size == (1, 1)) == 16
    assert type(model.layer2[0].downsample[0]) is nn.Conv2d and isinstance(model.layer2[0].conv1, convs.EdgeConv2d)


def test_spec_start_random_reaches_the_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1))
    source = model[0].weight.detach().clone()
    convs.convert(model, "edge:start=random")
    layer = model[0]
    assert torch.equal(layer.weight, source)
    assert not torch.allclose(layer.region_filter(0), source)
