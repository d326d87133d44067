"""--init: where a trial's weights start. A plain model converts to any variant from its function; a converted one
loads into its own variant, every tensor; sources that are not there fail before any trial starts."""

import copy
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import convs
from orchestrator import sweep, weights
from orchestrator.cli import CliError
from orchestrator.loop import save_checkpoint
from tasks import get_task
from tasks.hotels import EmbeddingNet


def perturbed_resnet18(num_classes: int = 4) -> nn.Module:
    """A resnet18 with non-trivial weights and BatchNorm statistics, in eval mode."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return model.eval()


def features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The network's pooled features, its head left out."""
    body = copy.deepcopy(model)
    body.fc = nn.Identity()
    with torch.no_grad():
        return body.eval()(x)


def test_the_forms_of_a_source_and_their_errors(tmp_path):
    assert weights.parse_init("scratch").kind == "scratch"
    assert weights.parse_init("runs:/abc123") == weights.Init("runs:/abc123", "run", "abc123")
    assert weights.parse_init("ckpt/best.pt").kind == "file"
    for bad in ("", "runs:/", "runs:/a/b", "torchvision:ResNet50"):
        with pytest.raises(weights.InitError, match="--init"):
            weights.parse_init(bad)
    with pytest.raises(weights.InitError, match="no such checkpoint file"):
        weights.check_init(weights.parse_init(str(tmp_path / "nope.pt")), None)
    with pytest.raises(weights.InitError, match="no such weights"):
        weights.torchvision_file("ResNet50_Weights.NOT_A_NAME")
    with pytest.raises(CliError, match="twice"):
        sweep.parse_inits(["scratch", "scratch"])
    assert sweep.parse_inits(None) == ("scratch",)
    assert sweep.parse_inits(["rel.pt"]) == (str(Path("rel.pt").resolve()),)  # workers run in other folders


def test_torchvision_weights_come_from_the_local_cache_only(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    name = "ResNet18_Weights.IMAGENET1K_V1"
    init = weights.parse_init(f"torchvision:{name}")
    with pytest.raises(weights.InitError, match="not in the local torch cache"):
        weights.check_init(init, None)
    source = perturbed_resnet18(num_classes=1000)
    path = weights.torchvision_file(name)
    assert path.parent == tmp_path / "hub" / "checkpoints" and path.name.startswith("resnet18-")
    path.parent.mkdir(parents=True)
    torch.save(source.state_dict(), path)  # the very file torchvision's download would write
    weights.check_init(init, None)
    hotels = get_task("hotels")
    model = EmbeddingNet("resnet18", embedding_dim=8)
    weights.initialize(model, hotels, "edge", {}, init, None)  # plain -> edge, region filters copied
    x = torch.randn(2, 3, 40, 40)
    torch.testing.assert_close(features(model.backbone, x), features(source, x), rtol=1e-4, atol=1e-4)


def test_a_saved_zero_checkpoint_converts_to_partial_and_gated_from_its_function(tmp_path):
    source = perturbed_resnet18()
    path = save_checkpoint({"model": source.state_dict(), "config": {"variant": "zero"}}, tmp_path, "best.pt")
    task = get_task("classification")
    init = weights.parse_init(str(path))
    x = torch.randn(2, 3, 40, 40)
    for variant in ("partial", "gated", "gated:norm=inside", "edge_no7"):
        model = torchvision.models.resnet18(weights=None, num_classes=4)
        options = {} if variant == "partial" else {"start": "random"}  # the preset's start, as the loop passes it
        weights.initialize(model, task, variant, options, init, None)  # a plain source: new filters copy anyway
        model.eval()
        if convs.parse_variant(variant).base == "partial":
            # Partial conv keeps every weight and changes only what the padding does, by design.
            for name, tensor in source.state_dict().items():
                torch.testing.assert_close(model.state_dict()[name], tensor, rtol=0, atol=0)
            assert sum(isinstance(m, convs.PartialConv2d) for m in model.modules()) == 20
        else:
            with torch.no_grad():
                torch.testing.assert_close(model(x), source(x), rtol=1e-4, atol=1e-4)


def test_a_converted_checkpoint_loads_every_tensor_into_its_own_variant_only(tmp_path):
    task = get_task("classification")
    source = perturbed_resnet18()
    convs.convert(source, "gated:norm=inside", start="random")
    source.eval()
    path = save_checkpoint({"model": source.state_dict(), "config": {"variant": "gated_311"}}, tmp_path, "g.pt")
    init = weights.parse_init(str(path))
    model = torchvision.models.resnet18(weights=None, num_classes=4)
    weights.initialize(model, task, "gated:norm=inside", {"start": "random"}, init, None)  # gated_311 is the same
    torch.testing.assert_close(model.state_dict(), source.state_dict(), rtol=0, atol=0)
    with pytest.raises(weights.InitError, match="initialises only gated_311 trials, not partial"):
        weights.initialize(torchvision.models.resnet18(num_classes=4), task, "partial", {}, init, None)
    torch.save({"optimizer": {}}, tmp_path / "odd.pt")
    with pytest.raises(weights.InitError, match="neither a state dict nor a checkpoint"):
        weights.load_init(weights.parse_init(str(tmp_path / "odd.pt")), None)
    (tmp_path / "cut.pt").write_bytes(path.read_bytes()[:100])
    with pytest.raises(weights.InitError, match="cannot read"):
        weights.load_init(weights.parse_init(str(tmp_path / "cut.pt")), None)


def test_a_classifier_initialises_a_segmentation_backbone(tmp_path):
    source = perturbed_resnet18(num_classes=1000)
    task = get_task("segmentation")
    smoke = task.presets["smoke"]
    whole = smoke.updated(model_options={**smoke.model_options, "stages": 4, "output_stride": 16})
    model = task.build_model(whole, num_classes=19)
    left_out = task.load_pretrained(model, source.state_dict())
    assert sorted(left_out) == ["fc.bias", "fc.weight"]
    torch.testing.assert_close(model.stem[0].weight, source.conv1.weight, rtol=0, atol=0)
    torch.testing.assert_close(model.layer4[1].bn2.running_var, source.layer4[1].bn2.running_var, rtol=0, atol=0)
    # The smoke and cpu presets' encoder ends after layer2: the rest of the classifier is reported, not loaded
    model = task.build_model(smoke, num_classes=19)
    left_out = task.load_pretrained(model, source.state_dict())
    assert {name.split(".")[0] for name in left_out} == {"layer3", "layer4", "fc"}
    torch.testing.assert_close(model.layer2[1].bn2.running_var, source.layer2[1].bn2.running_var, rtol=0, atol=0)
