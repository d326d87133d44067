"""Presets refuse unknown keys and out-of-range values with a message that names the field, the range and a fix."""

import math
from dataclasses import fields

import pytest

import tasks
from tasks import ClassificationPreset, Preset, PresetError, SegmentationPreset, get_task

# Bad values for every field of every task's preset class; a new field without an entry fails the test below.
BAD = {
    "model": ["", "   ", 3, None],
    "epochs": [-3, 0, 2.5, True, "12", None],
    "batch_size": [0, -1, 1.5, False, "32"],
    "lr": [0, -0.1, math.nan, math.inf, "0.1", True, None],
    "optimizer": ["rmsprop", "SGD", "", None],
    "momentum": [-0.1, 1.0, 1.5, math.nan],
    "weight_decay": [-1e-4, math.nan, "0"],
    "schedule": ["cosine", None],
    "step_size": [0, -5, 2.5],
    "gamma": [0, -0.5, math.inf],
    "poly_power": [0, -1.0],
    "image_size": [0, -32, 32.5],
    "max_batches": [0, -1, 1.5, True],
    "eval_batch_size": [0, 2.5, False],
    "eval_every": [0, -1, 1.5, True, None],
    "sync_bn": [1, "yes", None],
    "amp": ["fp32", "BF16", "", True, 16],
    "variants": [(), [], "zero", ("zero", ""), ("zero", 3), ("zero", "zero"), None],
    "variant_start": ["copied", "", None],
    "model_options": [None, [("output_stride", 8)], "output_stride=8"],
    "synthetic": [None, 3],
    "bad_images": ["Skip", "ignore", "", None, True],
    "eval_size": [0, 1.5, None],
    "crop_scale": [(0, 1), (0.5, 0.2), (0.5, 1.5), (0.5,), "0.5,1", (0.1, math.nan), (-0.1, 1.0), None],
    "tile_size": [0, -1, 2.5, True],
    "scale_range": [(0, 1), (2.0, 0.5), (0.5,), (-1, 1), (0.5, math.inf), None],
    "class_uniform": [-0.1, 1.5, math.nan, True, None, "0.5"],
    "color_jitter": [-0.25, 0.6, math.inf, None],
    "gaussian_blur": [1, 0, "yes", None],
    "embedding_dim": [0, 2.5, None],
    "embedding_bn": [1, "yes", None],
    "margin": [0, -0.1, math.nan, None],
    "hotels_per_batch": [1, 0, 2.5, None],
    "images_per_hotel": [1, 0, 2.5, None],
    "min_images": [0, 1.5, None, 2],  # 2: fewer than images_per_hotel, so no batch could be filled
    "occlusion_prob": [-0.1, 1.5, math.nan, None],
    "occluder_scale": [(0, 0.5), (0.7, 0.3), (0.3, 1.5), None],
    "index": ["ivfpq", "", None],
    "index_options": [None, "nprobe=8"],
}
CASES = [
    pytest.param(name, key, value, id=f"{name}-{key}={value!r}")
    for name in sorted(tasks.TASKS)
    for key in sorted(f.name for f in fields(get_task(name).preset_class))
    for value in BAD.get(key, [])
]


@pytest.mark.parametrize("name", sorted(tasks.TASKS))
def test_every_field_has_a_range_and_bad_values_here(name):
    preset_class = get_task(name).preset_class
    keys = {f.name for f in fields(preset_class)}
    assert keys <= set(preset_class.checks), "every field needs an entry in checks"
    assert keys <= set(BAD), f"add bad values for {sorted(keys - set(BAD))} to BAD"


@pytest.mark.parametrize("name,key,value", CASES)
def test_out_of_range_values_are_refused_naming_field_value_range_and_fix(name, key, value):
    preset = get_task(name).presets["smoke"]
    with pytest.raises(PresetError, match=rf"^Invalid preset value {key}=.*: expected .* \(e\.g\. .+\)\.$") as error:
        preset.updated(**{key: value})
    assert repr(value) in str(error.value)
    assert isinstance(error.value, ValueError)  # callers that catch ValueError keep working


def test_the_message_a_new_user_sees_for_negative_epochs():
    with pytest.raises(PresetError) as error:
        get_task("segmentation").presets["cpu"].updated(epochs=-3)
    assert str(error.value) == "Invalid preset value epochs=-3: expected an integer >= 1 (e.g. --epochs 12)."


def test_construction_is_checked_too():
    with pytest.raises(PresetError, match=r"lr=0: expected a number > 0"):
        Preset(model="resnet18", epochs=1, batch_size=1, lr=0)
    with pytest.raises(PresetError, match=r"momentum=1.0: expected a number in \[0, 1\)"):
        ClassificationPreset(model="resnet18", epochs=1, batch_size=1, lr=0.1, momentum=1.0)
    crop_error = r"crop_scale=\(0.9, 0.1\): expected a pair \(lo, hi\) with 0 < lo <= hi <= 1"
    with pytest.raises(PresetError, match=crop_error):
        ClassificationPreset(model="resnet18", epochs=1, batch_size=1, lr=0.1, crop_scale=(0.9, 0.1))
    with pytest.raises(PresetError, match=r"optimizer='rmsprop': expected one of sgd, adam"):
        SegmentationPreset(model="resnet18", epochs=1, batch_size=1, lr=0.1, optimizer="rmsprop")


def test_good_values_are_normalised():
    """What JSON, Tune samples and resumed sweeps hand over: integral floats, ints for floats, lists for pairs."""
    preset = get_task("segmentation").presets["smoke"]
    updated = preset.updated(epochs=12.0, lr=1, scale_range=[0.5, 2], tile_size=None, max_batches=None)
    assert updated.epochs == 12 and type(updated.epochs) is int
    assert updated.lr == 1.0 and type(updated.lr) is float
    assert updated.scale_range == (0.5, 2.0) and updated.tile_size is None and updated.max_batches is None
    assert updated.updated(momentum=0.0, weight_decay=0).momentum == 0.0
    classification = get_task("classification").presets["smoke"]
    assert classification.updated(crop_scale=[0.08, 1]).crop_scale == (0.08, 1.0)


@pytest.mark.parametrize("name", sorted(tasks.TASKS))
def test_unknown_keys_are_refused_listing_the_task_presets_keys(name):
    task = get_task(name)
    known = sorted(f.name for f in fields(task.preset_class))
    message = rf"Unknown preset key\(s\) \['epoch'\]\. Known keys: {', '.join(known)}\."
    with pytest.raises(PresetError, match=message):
        task.presets["smoke"].updated(epoch=3)


@pytest.mark.parametrize("name,other", [(a, b) for a in sorted(tasks.TASKS) for b in sorted(tasks.TASKS) if a != b])
def test_another_task_own_keys_are_unknown(name, other):
    """`tile_size` means nothing to classification: an override of it is an error, not silently ignored."""
    own = {f.name for f in fields(get_task(name).preset_class)}
    foreign = sorted({f.name for f in fields(get_task(other).preset_class)} - own)
    assert foreign
    for key in foreign:
        with pytest.raises(PresetError, match=rf"Unknown preset key\(s\) \['{key}'\]"):
            get_task(name).presets["smoke"].updated(**{key: getattr(get_task(other).presets["smoke"], key)})


def test_new_fields_accept_their_good_values():
    preset = get_task("segmentation").presets["smoke"]
    assert preset.updated(amp="bf16").amp == "bf16" and preset.updated(amp="fp16").amp == "fp16"
    assert preset.updated(amp=None).amp is None
    assert preset.updated(variants=["zero", "gated:norm=inside"]).variants == ("zero", "gated:norm=inside")
    assert preset.updated(variant_start="copy").variant_start == "copy"
    updated = preset.updated(class_uniform=1, color_jitter=0, gaussian_blur=True)
    assert updated.class_uniform == 1.0 and type(updated.class_uniform) is float and updated.gaussian_blur is True


@pytest.mark.parametrize("name", sorted(tasks.TASKS))
def test_thesis_presets_follow_the_thesis_and_the_small_ones_stay_as_they_were(name):
    presets = get_task(name).presets
    thesis = presets["thesis"]
    assert thesis.amp is None and thesis.variant_start == "random"  # fp32, trained from scratch
    assert thesis.variants[0] == "zero" and "affine" in thesis.variants
    assert presets["cpu"].variant_start == "random" and presets["smoke"].variant_start == "copy"
    for small in ("cpu", "smoke"):
        assert presets[small].amp is None
        if name != "hotels":
            assert presets[small].variants == ("zero", "partial", "gated", "edge", "affine")
    if name == "hotels":  # thesis tables 4.5, 4.6: Zero, Partial_1ch, Partial (multi-channel mask), Gated eq. 3.11
        assert thesis.batch_size == 104 == thesis.hotels_per_batch * thesis.images_per_hotel  # 13 hotels x 8
        assert thesis.variants == ("zero", "partial_1ch", "partial", "gated:norm=inside", "affine")
        assert presets["cpu"].variants == presets["smoke"].variants == thesis.variants
        assert (thesis.model, thesis.epochs, thesis.optimizer, thesis.lr, thesis.margin) == (
            "resnet50",
            12,
            "adam",
            1e-5,
            0.1,
        )
        assert (thesis.momentum, thesis.embedding_dim, thesis.min_images) == (0.9, 256, 8)  # Adam betas (0.9, 0.999)
        with pytest.raises(PresetError, match=r"batch_size=100: expected hotels_per_batch x images_per_hotel"):
            thesis.updated(batch_size=100)
    elif name == "classification":
        assert thesis.batch_size == 64  # global, thesis section 4.1
        assert thesis.variants == ("zero", "partial", "gated:norm=inside", "edge", "edge_no7", "affine")
        assert (presets["cpu"].batch_size, presets["smoke"].batch_size) == (32, 16)
    else:
        assert thesis.batch_size == 16  # global: 8 GPUs x 2 images
        assert thesis.variants == ("zero", "partial", "gated", "affine")  # gated: eq. 3.12, the convert default
        assert (thesis.class_uniform, thesis.color_jitter, thesis.gaussian_blur) == (0.5, 0.25, True)
        assert (presets["cpu"].batch_size, presets["smoke"].batch_size) == (8, 8)
        for small in ("cpu", "smoke"):
            assert (presets[small].class_uniform, presets[small].color_jitter, presets[small].gaussian_blur) == (
                0.0,
                0.0,
                False,
            )


def test_presets_are_frozen():
    preset = get_task("classification").presets["smoke"]
    with pytest.raises(AttributeError):
        preset.epochs = 3
