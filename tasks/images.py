"""Opening image files, the one way every task's datasets do it: decoded whole, so that a damaged file is found
where it is read, named, and handled as the preset's `bad_images` says.

`Image.open` reads only the header: a file cut short or garbled after it opens fine and fails (or, with
`ImageFile.LOAD_TRUNCATED_IMAGES`, silently comes out grey) only when its pixels are decoded, somewhere deep in a
transform. `open_image` decodes at once and raises `CorruptImageError` naming the file, why, and the fix.

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

import logging
import os
from collections.abc import Callable, Iterator
from itertools import chain
from typing import Any, TypeVar

import numpy as np
from PIL import Image, ImageFile

logger = logging.getLogger(__name__)

T = TypeVar("T")

BAD_IMAGES = ("fail", "skip")  # the choices of the preset field `bad_images`
FIX = (
    "Replace the file, or leave damaged images out, each named in a warning: `--bad-images skip` on the sweep's "
    'command line (the preset field bad_images="skip")'
)

_logged: set[str] = set()  # files already warned about in this process


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
    """`open_image(path, "RGB")`: a loader for torchvision's ImageFolder and ImageNet."""
    return open_image(path, "RGB")


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
