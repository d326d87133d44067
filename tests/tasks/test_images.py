"""`tasks.images`: files decoded whole (PIL's `open_image`; torchvision.io's `read_image`, the same pixels as
tensors), a damaged one named with its reason and the fix, and the preset's choice between failing and skipping
(a substitute item from the same group, each file warned about once)."""

import io
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2.functional import pil_to_tensor

import tasks
from tasks import images
from tasks.images import BAD_IMAGES, BadImages, CorruptImageError, decode_bytes, open_image, read_image, substitutes


@pytest.fixture(autouse=True)
def fresh_log(monkeypatch):
    """Each test starts with no file warned about yet in this process."""
    monkeypatch.setattr(images, "_logged", set())


def encoded(fmt: str, mode: str = "RGB", size: tuple[int, int] = (40, 30)) -> bytes:
    rng = np.random.default_rng(0)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(out, fmt)
    return out.getvalue()


DAMAGE = {
    "jpeg cut in half": lambda: encoded("JPEG")[: len(encoded("JPEG")) // 2],
    "png cut in half": lambda: encoded("PNG")[: len(encoded("PNG")) // 2],
    "label png cut in half": lambda: encoded("PNG", "L")[: len(encoded("PNG", "L")) // 2],
    "png header then garbage": lambda: encoded("PNG")[:60] + np.random.default_rng(1).bytes(600),
    "garbage": lambda: np.random.default_rng(2).bytes(800),
    "html error page": lambda: b"<html>404 Not Found</html>",
    "empty": lambda: b"",
}


def damaged_file(tmp_path: Path, damage: str) -> Path:
    """A file of an ImageNet class folder holding the `DAMAGE[damage]` bytes."""
    path = tmp_path / "n01440764" / "bad.JPEG"
    path.parent.mkdir()
    path.write_bytes(DAMAGE[damage]())
    return path


@pytest.mark.parametrize("fmt,mode", [("JPEG", "RGB"), ("PNG", "RGB"), ("PNG", "L")])
def test_a_good_file_is_decoded_whole_and_outlives_its_file(tmp_path, fmt, mode):
    path = tmp_path / f"good.{fmt.lower()}"
    path.write_bytes(encoded(fmt, mode))
    image = open_image(path)
    assert image.mode == mode and image.size == (40, 30)
    assert np.asarray(image).shape[:2] == (30, 40)  # pixels there after the file was closed
    assert open_image(path, "RGB").mode == "RGB" and open_image(str(path), "L").mode == "L"
    if fmt == "PNG":  # lossless: the same pixels PIL's lazy open gives
        with Image.open(path) as lazy:
            assert np.array_equal(np.asarray(open_image(path)), np.asarray(lazy))


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_file_raises_naming_the_file_the_reason_and_the_fix(tmp_path, damage):
    path = damaged_file(tmp_path, damage)
    with pytest.raises(CorruptImageError) as error:
        open_image(path, "RGB")
    message = str(error.value)
    assert message.startswith(f"Cannot decode the image {path} (")
    assert 'bad_images="skip"' in message and "Replace the file" in message
    assert error.value.path == str(path) and error.value.reason in message
    assert isinstance(error.value, ValueError) and error.value.__cause__ is not None


def test_pil_lazy_open_alone_would_not_notice_a_cut_jpeg(tmp_path):
    """Why `open_image` decodes at once: the header is intact, only the pixels are missing."""
    path = tmp_path / "cut.jpg"
    path.write_bytes(DAMAGE["jpeg cut in half"]())
    with Image.open(path) as image:
        assert image.size == (40, 30)
    with pytest.raises(CorruptImageError, match="truncated"):
        open_image(path)


def test_the_error_keeps_its_type_and_path_across_processes(tmp_path):
    path = tmp_path / "bad.png"
    path.write_bytes(DAMAGE["png cut in half"]())
    with pytest.raises(CorruptImageError) as error:
        open_image(path)
    copy = pickle.loads(pickle.dumps(error.value))
    assert (type(copy), str(copy), copy.path, copy.reason) == (
        CorruptImageError,
        str(error.value),
        error.value.path,
        error.value.reason,
    )
    assert str(CorruptImageError("message only")) == "message only"  # how a DataLoader worker's error is rebuilt

    class Files(Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, index):
            return torch.from_numpy(np.asarray(open_image(path)).copy())

    with pytest.raises(CorruptImageError, match=str(path)):
        next(iter(DataLoader(Files(), batch_size=2, num_workers=1)))


def test_a_missing_file_is_the_file_systems_fault_never_skipped(tmp_path):
    path = tmp_path / "gone.jpg"
    with pytest.raises(FileNotFoundError) as error:
        open_image(path)
    assert not isinstance(error.value, CorruptImageError)
    assert any(str(path) in note for note in error.value.__notes__)
    with pytest.raises(FileNotFoundError):
        BadImages("skip").get(lambda i: open_image(path), 0, lambda: iter([1]))


def test_a_decompression_bomb_is_raised_naming_the_file_never_skipped(tmp_path, monkeypatch):
    path = tmp_path / "huge.png"
    path.write_bytes(encoded("PNG"))  # 1200 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # more than twice the limit: PIL's error
    with pytest.raises(Image.DecompressionBombError, match=rf"^{path}: .*MAX_IMAGE_PIXELS") as error:
        open_image(path)
    assert not isinstance(error.value, CorruptImageError)
    with pytest.raises(Image.DecompressionBombError):
        BadImages("skip").get(lambda i: open_image(path), 0, lambda: iter([1]))


def test_truncated_images_are_never_loaded_silently(tmp_path, monkeypatch):
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # with every task imported (`tasks` imports them all)
    path = tmp_path / "good.png"
    path.write_bytes(encoded("PNG"))
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES is True"):
        open_image(path)


# read_image: torchvision.io's decoding, PIL's pixels and errors -------------------------------------------------------


@pytest.fixture
def no_pil_decoding(monkeypatch):
    """`open_image` (PIL's full decode) refused: what still loads was decoded by torchvision.io."""

    def refused(path, mode=None):
        raise AssertionError(f"PIL decoded {path}")

    monkeypatch.setattr(images, "open_image", refused)


@pytest.mark.parametrize("fmt,stored", [("JPEG", "RGB"), ("JPEG", "L"), ("PNG", "RGB"), ("PNG", "L"), ("PNG", "RGBA")])
def test_read_image_gives_pils_pixels_as_a_uint8_tensor_decoded_by_torchvision(tmp_path, fmt, stored, monkeypatch):
    path = tmp_path / f"good.{fmt.lower()}"
    path.write_bytes(encoded(fmt, stored, size=(50, 30)) if stored != "RGBA" else rgba_png())
    modes = [m for m in ("RGB", "L", None) if m in images._TENSOR_DECODES[fmt, stored]]
    expected = {mode: pil_to_tensor(open_image(path, mode)) for mode in modes}
    monkeypatch.setattr(images, "open_image", lambda *a: pytest.fail("decoded by PIL"))
    for mode in modes:
        pixels = read_image(path, mode)
        assert pixels.dtype == torch.uint8 and pixels.shape[-2:] == (30, 50)
        assert torch.equal(pixels, expected[mode]), mode  # libjpeg-turbo both: the very same pixels
    assert read_image(str(path), "RGB").shape == (3, 30, 50)


def rgba_png() -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 50, 4), dtype=np.uint8), "RGBA").save(out, "PNG")
    return out.getvalue()


def test_read_image_keeps_a_palette_label_maps_indices(tmp_path, no_pil_decoding):
    ids = (np.arange(30 * 40).reshape(30, 40) % 34).astype(np.uint8)
    label = Image.fromarray(ids, "L").convert("P")
    label.putpalette([(i * 37) % 256 for i in range(768)])
    label.putdata(ids.flatten().tolist())
    path = tmp_path / "labelIds.png"
    label.save(path)
    assert np.array_equal(read_image(path)[0].numpy(), ids)


@pytest.mark.parametrize("fmt,stored,mode", [("BMP", "RGB", "RGB"), ("JPEG", "CMYK", "RGB"), ("PNG", "RGB", "L")])
def test_read_image_lets_pil_decode_what_torchvision_would_decode_otherwise(tmp_path, fmt, stored, mode):
    path = tmp_path / f"other.{fmt.lower()}"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).convert(stored).save(path, fmt)
    assert torch.equal(read_image(path, mode), pil_to_tensor(open_image(path, mode)))


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_read_image_raises_for_a_damaged_file_what_pil_raises(tmp_path, damage):
    path = damaged_file(tmp_path, damage)
    with pytest.raises(CorruptImageError) as pil:
        open_image(path, "RGB")
    for mode in ("RGB", None):
        with pytest.raises(CorruptImageError) as error:
            read_image(path, mode)
        assert str(error.value) == str(pil.value) and error.value.path == str(path)


def test_read_image_and_the_file_systems_faults_bombs_and_truncated_loading(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError) as error:
        read_image(tmp_path / "gone.jpg")
    assert any(str(tmp_path / "gone.jpg") in note for note in error.value.__notes__)
    path = tmp_path / "huge.png"
    path.write_bytes(encoded("PNG"))  # 1200 pixels
    with monkeypatch.context() as patched:
        patched.setattr(Image, "MAX_IMAGE_PIXELS", 500)
        with pytest.raises(Image.DecompressionBombError, match=rf"^{path}: .*MAX_IMAGE_PIXELS"):
            read_image(path, "RGB")
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES is True"):
        read_image(path)


def test_decode_bytes_as_read_image(tmp_path, no_pil_decoding):
    data = encoded("PNG", "L")
    (tmp_path / "crop.png").write_bytes(data)
    assert torch.equal(decode_bytes(data, "L"), read_image(tmp_path / "crop.png", "L"))
    assert decode_bytes(data, "L").shape == (1, 30, 40)


def test_substitutes_come_from_the_same_group_first_then_the_next_items():
    assert list(substitutes(2, 5)) == [3, 4, 0, 1]
    assert list(substitutes(0, 1)) == []
    groups = np.array([7, 8, 7, 7, 8, 9])
    assert list(substitutes(2, 6, groups)) == [3, 0, 4, 5, 1]
    assert list(substitutes(5, 6, groups)) == [0, 1, 2, 3, 4]  # alone in its group


def loader_with_bad(bad: set[int], calls: list[int]):
    def load(index):
        calls.append(index)
        if index in bad:
            raise CorruptImageError(f"item {index} is bad", path=f"/data/{index}.jpg", reason="truncated")
        return index

    return load


def test_fail_lets_the_error_through():
    with pytest.raises(CorruptImageError, match="item 1 is bad"):
        BadImages("fail").get(loader_with_bad({1}, []), 1, lambda: pytest.fail("no substitute with fail"))


def test_skip_serves_the_first_good_substitute_and_warns_once_per_file(caplog):
    calls: list[int] = []
    load, skip = loader_with_bad({1, 2}, calls), BadImages("skip")
    with caplog.at_level(logging.WARNING, logger="tasks.images"):
        assert skip.get(load, 0, lambda: iter([1, 2, 3])) == 0
        assert skip.get(load, 1, lambda: iter([2, 3, 0])) == 3
        assert skip.get(load, 1, lambda: iter([2, 3, 0])) == 3  # again (a later epoch): straight to the substitute
        assert skip.get(load, 2, lambda: iter([3, 0, 1])) == 3
    assert calls == [0, 1, 2, 3, 3, 3]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned == [
        "bad_images=skip: leaving out the damaged image /data/1.jpg (truncated)",
        "bad_images=skip: leaving out the damaged image /data/2.jpg (truncated)",
    ]
    assert skip.bad == {1, 2}


def test_skip_with_nothing_readable_says_so():
    with pytest.raises(CorruptImageError, match=r"no item of this dataset can be decoded \(3 tried for item 0"):
        BadImages("skip").get(loader_with_bad({0, 1, 2}, []), 0, lambda: iter([1, 2]))


def test_an_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="bad_images='ignore': expected one of fail, skip"):
        BadImages("ignore")


@pytest.mark.parametrize("name", sorted(tasks.TASKS))
def test_every_preset_fails_on_a_damaged_file_unless_told_to_skip(name):
    presets = tasks.get_task(name).presets
    assert {preset.bad_images for preset in presets.values()} == {"fail"}
    assert presets["smoke"].updated(bad_images="skip").bad_images == "skip"
    with pytest.raises(tasks.PresetError) as error:
        presets["smoke"].updated(bad_images="ignore")
    assert str(error.value) == (
        "Invalid preset value bad_images='ignore': expected one of fail, skip (e.g. bad_images=\"skip\")."
    )
    assert tasks.Preset.checks["bad_images"].choices == BAD_IMAGES
