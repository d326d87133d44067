"""EmbeddingNet: unit-length fp32 embeddings, every conv variant converts the whole backbone, torchvision checkpoints
load by name (the head skipped), and a copy-started conversion keeps the loaded model's function."""

import copy
import warnings

import pytest
import torch
import torchvision
from torch import nn

import convs
from tasks.hotels.model import EmbeddingNet, build_model, load_backbone_state
from tasks.hotels.presets import PRESETS

RESNET18_CONVS = 20


def _perturbed_resnet18_state() -> dict[str, torch.Tensor]:
    """A torchvision resnet18 state dict whose BatchNorms are not the identity (as after training)."""
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return net.state_dict()


def test_embeddings_are_unit_rows_of_the_embedding_dim_and_train():
    model = EmbeddingNet("resnet18", embedding_dim=32)
    out = model(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, 32) and out.dtype == torch.float32
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3))
    out[:, 0].sum().backward()
    assert model.backbone.conv1.weight.grad is not None and model.backbone.fc.weight.grad.abs().sum() > 0


def test_normalised_in_fp32_under_autocast():
    model = EmbeddingNet("resnet18", embedding_dim=16).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 32, 32))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2), atol=1e-6, rtol=0)


def test_build_model_from_the_preset_and_unknown_models():
    model = build_model(PRESETS["smoke"])
    assert isinstance(model, EmbeddingNet) and isinstance(model.backbone, torchvision.models.ResNet)
    assert PRESETS["smoke"].embedding_bn and not PRESETS["thesis"].embedding_bn
    linear, norm = model.backbone.fc
    assert linear.out_features == norm.num_features == PRESETS["smoke"].embedding_dim
    assert isinstance(build_model(PRESETS["thesis"]).backbone.fc, torch.nn.Linear)  # the thesis' plain embedding
    assert {k for k in model.state_dict() if not k.startswith("backbone.")} == set()
    with pytest.raises(ValueError, match="Unknown torchvision model 'resnet19'"):
        EmbeddingNet("resnet19")
    with pytest.raises(ValueError, match="fc"):
        EmbeddingNet("squeezenet1_0")


def test_load_backbone_state_loads_every_backbone_tensor_and_skips_the_head():
    state = _perturbed_resnet18_state()
    model = EmbeddingNet("resnet18", embedding_dim=16)
    head = copy.deepcopy(model.backbone.fc.state_dict())
    skipped = load_backbone_state(model, state)
    assert sorted(skipped) == ["fc.bias", "fc.weight"]
    loaded = model.backbone.state_dict()
    backbone_keys = [k for k in loaded if not k.startswith("fc.")]
    assert len(backbone_keys) == len(state) - 2
    for k in backbone_keys:
        torch.testing.assert_close(loaded[k], state[k], rtol=0, atol=0)
    torch.testing.assert_close(model.backbone.fc.state_dict(), head, rtol=0, atol=0)  # the embedding untouched

    other = EmbeddingNet("resnet18", embedding_dim=8)  # an EmbeddingNet's state dict, of another embedding size
    assert sorted(load_backbone_state(other, model.state_dict())) == ["backbone.fc.bias", "backbone.fc.weight"]
    torch.testing.assert_close(other.backbone.layer4[1].bn2.running_var, state["layer4.1.bn2.running_var"])
    same = EmbeddingNet("resnet18", embedding_dim=16)  # the same width: every tensor loads, the embedding too
    assert load_backbone_state(same, model.state_dict()) == []
    torch.testing.assert_close(same.state_dict(), model.state_dict(), rtol=0, atol=0)


def test_load_backbone_state_refuses_missing_or_misshapen_tensors():
    model = EmbeddingNet("resnet18", embedding_dim=16)
    state = torchvision.models.resnet18(weights=None).state_dict()
    without_counts = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}  # older checkpoints
    assert sorted(load_backbone_state(model, without_counts)) == ["fc.bias", "fc.weight"]
    missing = {k: v for k, v in state.items() if k != "layer2.0.conv1.weight"}
    with pytest.raises(ValueError, match=r"lacks 1 .*layer2\.0\.conv1\.weight"):
        load_backbone_state(model, missing)
    misshapen = {**state, "conv1.weight": torch.zeros(64, 3, 3, 3)}
    with pytest.raises(ValueError, match=r"another shape: conv1\.weight"):
        load_backbone_state(model, misshapen)
    with pytest.raises(ValueError, match="another shape"):  # a resnet50 checkpoint into a resnet18
        load_backbone_state(model, torchvision.models.resnet50(weights=None).state_dict())


@pytest.mark.parametrize("variant", ["partial", "gated:norm=inside", "edge"])
def test_every_variant_converts_every_backbone_conv_and_copies_keep_the_loaded_function(variant):
    """partial changes border outputs by design; gated and edge started as copies compute the source's function."""
    model = EmbeddingNet("resnet18", embedding_dim=16)
    load_backbone_state(model, _perturbed_resnet18_state())
    reference = copy.deepcopy(model).eval()
    assert sum(type(m) is nn.Conv2d for m in model.modules()) == RESNET18_CONVS
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # gated:norm=inside traces the model with torch.fx: no fallback warning
        replaced = convs.convert(model, variant, **({} if variant == "partial" else {"start": "copy"}))
    assert replaced == RESNET18_CONVS
    assert sum(type(m) is nn.Conv2d for m in model.modules()) == 0
    assert sum(isinstance(m, convs.get(variant)) for m in model.modules()) == RESNET18_CONVS
    if variant.startswith("gated"):  # each BatchNorm moved into its gated conv (eq. 3.11)
        assert isinstance(model.backbone.bn1, nn.Identity) and isinstance(model.backbone.layer1[0].bn2, nn.Identity)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, 16)
        if variant != "partial":
            torch.testing.assert_close(out, reference(x), atol=1e-4, rtol=0)


def test_the_embedding_batchnorm_opens_the_cone_of_untrained_embeddings():
    """Untrained, a ResNet's embeddings of unrelated images point almost the same way; centred per dimension over
    the batch (`embedding_bn`), they spread out (what lets the triplet loss learn from scratch, see the model)."""
    torch.manual_seed(0)
    images = torch.randn(16, 3, 48, 48)

    def mean_cosine(model: EmbeddingNet) -> float:
        with torch.no_grad():
            out = model(images)
        cosines = out @ out.T
        return float((cosines.sum() - cosines.diagonal().sum()) / (16 * 15))

    assert mean_cosine(EmbeddingNet("resnet18", embedding_dim=32)) > 0.7
    assert abs(mean_cosine(EmbeddingNet("resnet18", embedding_dim=32, embedding_bn=True))) < 0.2


def test_an_embedding_batchnorm_model_loads_a_classifier_backbone_and_its_own_checkpoint():
    state = _perturbed_resnet18_state()
    model = EmbeddingNet("resnet18", embedding_dim=16, embedding_bn=True)
    assert sorted(load_backbone_state(model, state)) == ["fc.bias", "fc.weight"]  # the classifier's head left out
    torch.testing.assert_close(model.backbone.layer4[1].bn2.running_var, state["layer4.1.bn2.running_var"])
    model.backbone.fc[1].running_mean.uniform_(-1, 1)
    same = EmbeddingNet("resnet18", embedding_dim=16, embedding_bn=True)
    assert load_backbone_state(same, model.state_dict()) == []  # every tensor, the embedding's BatchNorm too
    torch.testing.assert_close(same.state_dict(), model.state_dict(), rtol=0, atol=0)
