"""Opening image files, the one way every task's datasets do it: decoded whole, so that a damaged file is found
where it is read, named, and handled as the preset's `bad_images` says.

`Image.open` reads only the header: a file cut short or garbled after it opens fine and fails (or, with
`ImageFile.LOAD_TRUNCATED_IMAGES`, silently comes out grey) only when its pixels are decoded, somewhere deep in a
transform. `open_image` decodes at once and raises `CorruptImageError` naming the file, why, and the fix.

The datasets read pixels with `read_image`: a uint8 tensor (C, H, W) decoded by torchvision.io (libjpeg-turbo,
libpng) from the file's bytes, for the transforms to run as torchvision.transforms.v2 on uint8 tensors, a third
faster than decoding and transforming with PIL (docs/data_loading.md). PIL still reads the header first (format,
mode, size: the decompression-bomb check), and whatever torchvision cannot decode is decoded again by `open_image`
through PIL: a file PIL reads (CMYK JPEGs, TIFFs, 16-bit PNGs...) is served as PIL decodes it, a damaged one raises
the same `CorruptImageError`, with PIL's reason, as PIL alone would.

`bad_images="fail"` lets that error stop the trial. `"skip"` (`BadImages`) leaves the file out: the dataset serves
another item in its place, the next one of the same group (class, hotel) in dataset order, else the next one at all,
wrapping round, and logs a warning naming the file, once per file and process. A substitute keeps every batch full,
so every Ray Train worker runs the same number of equally sized batches (a worker with a batch fewer would hang the
others in DDP's all-reduce), the hotels batches keep their hotels x images shape, and BatchNorm never sees a batch
of one; the DataLoaders need no collate function. The substitute is found the same way on every worker and in every
process, whichever saw the bad file first. In evaluation it is counted in the bad file's place (one item counted
twice per skipped file).
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from itertools import chain
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image, ImageFile
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as F

logger = logging.getLogger(__name__)

T = TypeVar("T")

BAD_IMAGES = ("fail", "skip")  # the choices of the preset field `bad_images`
FIX = (
    "Replace the file, or leave damaged images out, each named in a warning: `--bad-images skip` on the sweep's "
    'command line (the preset field bad_images="skip")'
)

_logged: set[str] = set()  # files already warned about in this process

# torchvision 0.29 deprecates its decoders in favour of TorchCodec (a separate package, not a dependency here); they
# are the ones this module means to use, on every item: say so once, in the docs, not on every DataLoader worker.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision are deprecated")

# What torchvision.io decodes exactly as PIL would: PIL's header (format, mode) -> the PIL modes it may be asked for
# (None: the pixels as stored). Anything else (CMYK or 16-bit images, TIFF, BMP, a palette image asked for as RGB, an
# RGB one asked for as L, whose grey weights differ) goes through PIL.
_TENSOR_DECODES = {
    ("JPEG", "RGB"): {"RGB", None},
    ("JPEG", "L"): {"RGB", "L", None},
    ("PNG", "RGB"): {"RGB", None},
    ("PNG", "RGBA"): {"RGB"},
    ("PNG", "L"): {"RGB", "L", None},
    ("PNG", "P"): {None},  # label maps stored with a palette: the indices, as np.array(image) gives them
}
_READ_MODES = {"RGB": ImageReadMode.RGB, "L": ImageReadMode.GRAY, None: ImageReadMode.UNCHANGED}


class CorruptImageError(ValueError):
    """An image file that cannot be decoded: truncated, garbled, or not an image at all. The message names the file,
    the reason and the fix; `path` and `reason` hold the first two.

    Built from its message alone, as a DataLoader worker's exception is rebuilt in the main process (which then has
    `path` None; pickling keeps it)."""

    def __init__(self, message: str, path: str | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.path, self.reason = path, reason

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (str(self), self.path, self.reason)


def open_image(path: str | os.PathLike[str], mode: str | None = None) -> Image.Image:
    """The image at `path`, decoded whole (`load()`), converted to `mode` ("RGB", "L", ...) where given.

    Raises:
        CorruptImageError: the file is not an image PIL can decode, or ends early (whatever PIL raised is its cause).
        PIL.Image.DecompressionBombError: more than twice `Image.MAX_IMAGE_PIXELS` pixels, the path added to PIL's
            message; never a `CorruptImageError`, so `bad_images="skip"` does not hide it.
        OSError with an errno (missing file, no permission, I/O error): the file system's fault, not the image's;
            raised as it is, a note naming the path added. Also never skipped.
        RuntimeError: `ImageFile.LOAD_TRUNCATED_IMAGES` is set, which would decode a cut-short file as grey.
    """
    path = os.fspath(path)
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (set by your code or an imported library): truncated images "
            f"would load with grey pixels instead of being reported, e.g. {path}. Set it back to False; to leave "
            'damaged images out, use the preset field bad_images="skip"'
        )
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert(mode) if mode is not None and image.mode != mode else image
    except Image.DecompressionBombError as error:
        raise Image.DecompressionBombError(
            f"{path}: {error} If the image is genuine, raise PIL.Image.MAX_IMAGE_PIXELS."
        ) from error
    except MemoryError:
        raise
    except OSError as error:
        if error.errno is not None:  # ENOENT, EACCES, EIO...: PIL's own errors carry no errno
            error.add_note(f"while reading the image {path}")
            raise
        raise _corrupt(path, error) from error
    except Exception as error:  # PIL's decoders also raise SyntaxError, ValueError, EOFError, struct.error, ...
        raise _corrupt(path, error) from error


def open_rgb(path: str | os.PathLike[str]) -> Image.Image:
    """`open_image(path, "RGB")`: a PIL loader for torchvision's ImageFolder and ImageNet."""
    return open_image(path, "RGB")


def read_image(path: str | os.PathLike[str], mode: str | None = None) -> torch.Tensor:
    """The image at `path` as a uint8 tensor (C, H, W), decoded whole by torchvision.io: `mode` "RGB" gives 3
    channels, "L" one, None the channels as stored (a palette PNG: its indices, as `np.array` of the PIL image).

    PIL reads the header from the file's bytes (a few microseconds): the decompression-bomb check, and the format
    and mode, which pick the decoder. JPEGs and PNGs go to torchvision.io (`decode_image`); other files, and any
    file torchvision fails on, are decoded by `open_image`: a file PIL can read comes back as PIL decodes it, a
    damaged one raises `open_image`'s errors, the same messages and reasons as PIL-only loading gave.

    Raises: as `open_image` (CorruptImageError, DecompressionBombError, OSError with an errno, RuntimeError).
    """
    path = os.fspath(path)
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        return _pil_tensor(path, mode)  # open_image's RuntimeError, naming the path
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as error:
        if error.errno is None:
            raise
        error.add_note(f"while reading the image {path}")
        raise
    pixels = _tensor_decode(data, mode, path)
    return pixels if pixels is not None else _pil_tensor(path, mode)


def decode_bytes(data: bytes, mode: str | None = None) -> torch.Tensor:
    """An image held in memory (e.g. a people crop read from a tarball and checked there) as a uint8 tensor (C, H, W),
    as `read_image` decodes a file: torchvision.io where it decodes as PIL would, else PIL. Whatever PIL raises
    for damaged bytes is raised as it is (there is no file to name)."""
    pixels = _tensor_decode(data, mode, "<bytes>")
    if pixels is None:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            pixels = F.pil_to_tensor(image.convert(mode) if mode is not None and image.mode != mode else image)
    return pixels.contiguous()


def _tensor_decode(data: bytes, mode: str | None, name: str) -> torch.Tensor | None:
    """`data` decoded by torchvision.io as a uint8 (C, H, W) tensor, or None where PIL should decode it: a format or
    mode outside `_TENSOR_DECODES`, a header PIL refuses (not an image, a decompression bomb), torchvision failing
    (cut short, garbled), or more than 8 bits a channel."""
    try:
        with Image.open(io.BytesIO(data)) as header:  # reads the header only
            if mode not in _TENSOR_DECODES.get((header.format, header.mode), ()):
                return None
    except MemoryError:
        raise
    except Exception:  # not an image, a bomb, ...: PIL says which
        return None
    try:
        pixels = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=_READ_MODES[mode])
    except MemoryError:
        raise
    except Exception as error:  # cut short, garbled: PIL decodes it anyway, or names what is wrong
        logger.debug("torchvision.io cannot decode %s (%s); trying PIL", name, error)
        return None
    return pixels if pixels.dtype == torch.uint8 else None  # a 16-bit RGB PNG (PIL: "RGB", 8 bits) comes as uint16


def read_rgb(path: str | os.PathLike[str]) -> torch.Tensor:
    """`read_image(path, "RGB")`: a tensor loader for torchvision's ImageFolder and ImageNet."""
    return read_image(path, "RGB")


def _pil_tensor(path: str, mode: str | None) -> torch.Tensor:
    """`open_image(path, mode)` as a tensor (C, H, W), of the dtype PIL's mode gives (uint8 for RGB, L, P)."""
    return F.pil_to_tensor(open_image(path, mode)).contiguous()


def _corrupt(path: str, error: Exception) -> CorruptImageError:
    reason = f"{type(error).__name__}: {error}"
    return CorruptImageError(f"Cannot decode the image {path} ({reason}). {FIX}.", path=path, reason=reason)


def substitutes(index: int, count: int, groups: np.ndarray | None = None) -> Iterator[int]:
    """The items that may stand in for a bad item `index` of `count`, in the order they are tried: the items after it
    of its own group (`groups[index]`: its class, its hotel), wrapping round, then all the others after it, wrapping
    round; without `groups`, all the items after it, wrapping round. Lazy: nothing is computed until asked."""
    after = chain(range(index + 1, count), range(index))
    if groups is None:
        yield from after
        return
    own = groups[index]
    same = np.flatnonzero(groups == own)
    yield from np.concatenate([same[same > index], same[same < index]]).tolist()
    yield from (i for i in after if groups[i] != own)


class BadImages:
    """What a dataset does with a file `open_image` cannot decode, as the preset's `bad_images` says.

    `get(load, index, candidates)` returns `load(index)`; when that raises `CorruptImageError`, "fail" lets it through
    and "skip" logs a warning naming the file and returns `load` of the first candidate that loads instead. The items
    found bad are remembered (per process), so later epochs go straight to the substitute.
    """

    def __init__(self, policy: str) -> None:
        if policy not in BAD_IMAGES:
            raise ValueError(f"bad_images={policy!r}: expected one of {', '.join(BAD_IMAGES)}")
        self.policy = policy
        self.bad: set[int] = set()

    def get(self, load: Callable[[int], T], index: int, candidates: Callable[[], Iterator[int]]) -> T:
        """`load(index)`, or with "skip" the first of `index`, `candidates()` that loads (CorruptImageError when none
        does)."""
        if self.policy == "fail":
            return load(index)
        tried = 0
        for candidate in chain((index,), candidates()):
            if candidate in self.bad:
                continue
            tried += 1
            try:
                item = load(candidate)
            except CorruptImageError as error:
                self.bad.add(candidate)
                where = error.path or str(error)
                if where not in _logged:
                    _logged.add(where)
                    logger.warning("bad_images=skip: leaving out the damaged image %s (%s)", where, error.reason)
                continue
            if candidate != index:
                logger.debug("item %d stands in for the damaged item %d", candidate, index)
            return item
        raise CorruptImageError(
            f"bad_images=skip: no item of this dataset can be decoded ({tried} tried for item {index}, "
            f"{len(self.bad)} damaged in all); the warnings above name the files"
        )
