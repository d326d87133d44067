"""Data loading: images per second per CPU core of each task's training and evaluation pipelines, and the loader
workers one GPU needs to be fed at a target rate.

    python -m benchmarks.data [--images N] [--size WxH] [--city-images N] [--city-size WxH] [--rounds N]
                              [--target IMAGES_PER_S] [--cpus N] [--gpus N] [--no-pil]

Every pipeline runs as one DataLoader worker runs it: the task's own dataset, item after item in one process with
one torch thread, from a file on disk (in the OS cache) to the normalised tensors of one item. The files are
synthetic but real-sized, written to a temporary folder in the tasks' layouts: ImageNet-sized JPEGs (500 x 375,
about 80 KB) for classification and hotels, Cityscapes-sized PNG frames and labelIds (2048 x 1024) for
segmentation; the recipes are the tasks' `thesis` presets (ImageNet 224 crops, Cityscapes 536 crops of 0.5-2x
rescaled frames with class-uniform crops, colour jitter and blur, Hotels-50K 224 crops with a people occluder).

`tensor` is the loaders' path: torchvision.io decoding, torchvision.transforms.v2 on uint8 tensors. `PIL` is the
path they had before, measured in the same run, interleaved round-robin with it so machine noise hits both alike
(medians): PIL decoding, transforms on PIL images (segmentation: on float32 tensors). `workers for target` is
how many loader workers one GPU needs at the tensor path's rate for `--target` images/s (default 3000: ResNet50
training in bf16 on one current GPU; a segmentation network at 536 px crops takes far fewer). The last lines
apply `tasks.data.loader_workers_per_gpu` to `--cpus` and `--gpus` (default: this machine, one GPU).
"""

from __future__ import annotations

import argparse
import io
import math
import os
import random
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as v1
from torchvision.transforms.v2 import functional as F

from benchmarks.common import describe, interleaved, median, table
from orchestrator.cli import ArgumentParser, CliError
from tasks import images
from tasks.classification import data as classification
from tasks.classification.presets import PRESETS as CLASSIFICATION_PRESETS
from tasks.common import IMAGENET_MEAN, IMAGENET_STD, disc, noisy_canvas, pixel_grid, to_uint8
from tasks.data import loader_workers_per_gpu
from tasks.hotels import data as hotels
from tasks.hotels.presets import PRESETS as HOTELS_PRESETS
from tasks.hotels.synthetic import people_crop
from tasks.segmentation import data as segmentation
from tasks.segmentation.presets import PRESETS as SEGMENTATION_PRESETS
from tasks.segmentation.synthetic import street_scene

WNIDS = ("n01440764", "n01443537")


def size(text: str) -> tuple[int, int]:
    """'500x375' -> (500, 375): width, height."""
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise CliError(f"expected a size as WIDTHxHEIGHT, e.g. 500x375, got {text!r}") from None
    if width < 8 or height < 8:
        raise CliError(f"size {text}: at least 8 x 8 pixels")
    return width, height


def photo(rng: np.random.Generator, width: int, height: int) -> bytes:
    """A JPEG (quality 90) of a noisy gradient with a few discs: about 75-80 KB at 500 x 375, as an ImageNet photo."""
    yy, xx = pixel_grid(height, width)
    canvas = noisy_canvas(rng, yy, xx, noise=30)
    for _ in range(6):
        r = rng.uniform(0.05, 0.3) * min(height, width)
        canvas[disc(yy, xx, rng.uniform(0, height), rng.uniform(0, width), r)] = rng.uniform(0, 255, 3)
    buffer = io.BytesIO()
    Image.fromarray(to_uint8(canvas)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_data(root: Path, *, count: int, width: int, height: int, city: int, city_size: tuple[int, int]) -> dict:
    """The three tasks' files under `root`: ImageNet-style folders, a Cityscapes tree, the hotels' photos (the
    same JPEGs: no CSVs needed, the datasets are built from records) and their people crops."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for n in range(count):
            wnid = WNIDS[n % len(WNIDS)]
            path = root / "imagenet" / split / wnid / f"{wnid}_{n}.JPEG"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(photo(rng, width, height))
        for n in range(city):
            scene, ids = street_scene(rng, city_size[1], city_size[0])
            stem = f"aachen_{n:06d}_000019"
            image = root / "cityscapes" / "leftImg8bit" / split / "aachen" / f"{stem}_leftImg8bit.png"
            label = root / "cityscapes" / "gtFine" / split / "aachen" / f"{stem}_gtFine_labelIds.png"
            for path, array in ((image, scene), (label, ids)):
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(png(array))
    photos = sorted((root / "imagenet" / "train").glob("*/*.JPEG"))
    records = [hotels.Record(n, n // 2, -1, hotels.SOURCES[n % 2], str(path)) for n, path in enumerate(photos)]
    crops = [png(people_crop(rng, int(rng.integers(120, 240)))) for _ in range(8)]
    return {"records": records, "crops": crops}


# the loaders' path: the tasks' own datasets ---------------------------------------------------------------------------


def tensor_pipelines(root: Path, made: dict) -> dict[str, Callable[[int], object]]:
    """Task pipeline name -> item function of the tasks' datasets, as the loaders read them."""
    cls, seg, hot = (CLASSIFICATION_PRESETS["thesis"], SEGMENTATION_PRESETS["thesis"], HOTELS_PRESETS["thesis"])
    return {
        "classification train": classification.build_dataset(root / "imagenet", cls, "train").__getitem__,
        "classification eval": classification.build_dataset(root / "imagenet", cls, "val").__getitem__,
        "segmentation train": segmentation.build_dataset(root / "cityscapes", seg, "train").__getitem__,
        "segmentation eval": segmentation.build_dataset(root / "cityscapes", seg, "val").__getitem__,
        "hotels train": hotels.TrainImages(root, made["records"], hot, made["crops"]).__getitem__,
        "hotels eval": hotels.EvalImages(root, made["records"], hot).__getitem__,
    }


# the PIL reference: the same recipes as the loaders read them before --------------------------------------------------


def pil_pipelines(root: Path, made: dict, tensor: dict) -> dict[str, Callable[[int], object]]:
    """The same pipelines with PIL decoding and PIL transforms (segmentation: float32 tensors), as before."""
    cls, hot = CLASSIFICATION_PRESETS["thesis"], HOTELS_PRESETS["thesis"]
    norm = [v1.ToTensor(), v1.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    recipes = {
        "train": v1.Compose([v1.RandomResizedCrop(cls.image_size, scale=cls.crop_scale), v1.RandomHorizontalFlip()]),
        "val": v1.Compose([v1.Resize(cls.eval_size), v1.CenterCrop(cls.image_size)]),
    }
    files = {split: sorted((root / "imagenet" / split).glob("*/*.JPEG")) for split in recipes}

    def imagenet(split: str) -> Callable[[int], object]:
        transform = v1.Compose([recipes[split], *norm])
        return lambda i: transform(images.open_rgb(files[split][i]))

    def cityscapes(name: str) -> Callable[[int], object]:
        dataset = tensor[name].__self__

        def item(i: int) -> object:
            image = F.pil_to_tensor(images.open_image(dataset.images[i], "RGB")).contiguous()
            label = torch.from_numpy(np.array(images.open_image(dataset.targets[i][0]), dtype=np.uint8))
            return dataset.transforms(F.to_dtype(image, torch.float32, scale=True), label)

        return item

    paths = [r.path for r in made["records"]]
    side, resize = hot.image_size, max(hot.eval_size, hot.image_size)

    def normalised(image: Image.Image, valid: torch.Tensor) -> torch.Tensor:
        pixels = F.to_dtype(F.pil_to_tensor(image), torch.float32, scale=True)
        return F.normalize(pixels, IMAGENET_MEAN, IMAGENET_STD) * valid

    def hotels_train(i: int) -> object:
        image = F.resize(images.open_image(paths[i], "RGB"), [resize])
        top = torch.randint(image.height - side + 1, ()).item()
        left = torch.randint(image.width - side + 1, ()).item()
        image = F.crop(image, top, left, side, side)
        if torch.rand(()).item() < 0.5:
            image = F.horizontal_flip(image)
        valid = torch.ones(1, side, side)
        crop = made["crops"][torch.randint(len(made["crops"]), ()).item()]
        return normalised(image, hotels.paste_occluder(valid, crop, hot.occluder_scale)), valid

    def hotels_eval(i: int) -> object:
        image = F.center_crop(F.resize(images.open_image(paths[i], "RGB"), [resize]), [side, side])
        return normalised(image, torch.ones(1, side, side))

    return {
        "classification train": imagenet("train"),
        "classification eval": imagenet("val"),
        "segmentation train": cityscapes("segmentation train"),
        "segmentation eval": cityscapes("segmentation eval"),
        "hotels train": hotels_train,
        "hotels eval": hotels_eval,
    }


def over(item: Callable[[int], object], count: int) -> Callable[[], None]:
    def run() -> None:
        for i in range(count):
            item(i)

    return run


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m benchmarks.data", description=__doc__)
    parser.add_argument("--images", type=int, default=48, help="ImageNet-sized JPEGs per split (default 48)")
    parser.add_argument("--size", type=size, default=(500, 375), help="their WIDTHxHEIGHT (default 500x375)")
    parser.add_argument("--city-images", type=int, default=4, help="Cityscapes frames per split (default 4)")
    parser.add_argument("--city-size", type=size, default=(2048, 1024), help="their WIDTHxHEIGHT (default 2048x1024)")
    parser.add_argument("--rounds", type=int, default=3, help="timed interleaved rounds (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    parser.add_argument(
        "--target", type=float, default=3000.0, help="images/s one GPU trains on (default 3000: ResNet50, bf16)"
    )
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="node cores for the rule (default: here)")
    parser.add_argument("--gpus", type=int, default=1, help="node GPUs for the rule (default 1)")
    parser.add_argument(
        "--pil",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure the PIL reference (default: on)",
    )
    args = parser.parse_args(argv)
    if min(args.images, args.city_images, args.rounds) < 1 or args.target <= 0:
        raise CliError("--images, --city-images and --rounds must be at least 1, --target above 0")
    width, height = args.size

    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="bench-data-") as folder:
        root = Path(folder)
        made = write_data(
            root, count=args.images, width=width, height=height, city=args.city_images, city_size=args.city_size
        )
        tensor = tensor_pipelines(root, made)
        counts = {name: args.city_images if name.startswith("segmentation") else args.images for name in tensor}
        cases = {f"{name} | tensor": over(item, counts[name]) for name, item in tensor.items()}
        if args.pil:
            pil = pil_pipelines(root, made, tensor)
            cases |= {f"{name} | PIL": over(item, counts[name]) for name, item in pil.items()}
        torch.manual_seed(0)
        random.seed(0)
        torch.set_num_threads(1)  # as in a DataLoader worker
        try:
            times = interleaved(cases, rounds=args.rounds, warmup=args.warmup, device=torch.device("cpu"))
        finally:
            torch.set_num_threads(threads)
        jpeg_kb = np.mean([os.path.getsize(r.path) for r in made["records"]]) / 1024

    rate = {case: counts[case.split(" | ")[0]] / median(seconds) for case, seconds in times.items()}
    figure = lambda x: f"{x:.0f}" if x >= 100 else f"{x:.1f}"  # noqa: E731
    rows = []
    for name in tensor:
        fast = rate[f"{name} | tensor"]
        row = [name, figure(fast)]
        if args.pil:
            slow = rate[f"{name} | PIL"]
            row += [figure(slow), f"{fast / slow:.2f}x"]
        rows.append(row + [str(math.ceil(args.target / fast))])
    headers = ["pipeline", "tensor img/s/core"] + (["PIL img/s/core", "tensor vs PIL"] if args.pil else [])
    headers.append(f"workers for {args.target:.0f} img/s")
    print(
        f"\nData loading, one process, 1 torch thread: {args.images} JPEGs of {width} x {height} "
        f"(mean {jpeg_kb:.0f} KB) per split, {args.city_images} Cityscapes frames of {args.city_size[0]} x "
        f"{args.city_size[1]} per split, thesis presets, {args.rounds} interleaved rounds (median)"
    )
    print(f"device: {describe(torch.device('cpu'))}\n")
    print(table(headers, rows))
    workers = loader_workers_per_gpu(args.cpus, args.gpus)
    fed = workers * rate["classification train | tensor"]
    print(
        f"\nloader_workers_per_gpu(cpus={args.cpus}, gpus={args.gpus}) = {workers} loader worker(s) per GPU: about "
        f"{fed:.0f} classification training images/s per GPU at the rate above "
        f"({'enough' if fed >= args.target else 'short of'} {args.target:.0f} img/s)"
    )


if __name__ == "__main__":
    main()
