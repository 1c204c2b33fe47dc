"""Scan-and-bucket time for a large folder of images, against references measured in the same run.

Writes N generated images (PNG and JPEG, sizes 256-1536 px, with captions) into a `<repeats>_<tokens>` folder, then
times ``build_dataset_group`` (list, read sizes from headers, read captions, assign buckets) and compares it with
(a) reading every image file's bytes and (b) decoding every image fully with PIL (measured on a sample and scaled).

    .venv/bin/python bench/bench_dataset_scan.py --images 10000 [--workdir /tmp/scan_bench]
"""

from __future__ import annotations

import argparse
import logging
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from PIL import Image  # noqa: E402

from library.data.dataset import DatasetOptions, build_dataset_group  # noqa: E402


def write_images(folder: Path, count: int, seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(count):
        size = (rng.randrange(256, 1536, 8), rng.randrange(256, 1536, 8))
        colour = tuple(rng.randrange(256) for _ in range(3))
        ext = ".png" if i % 2 else ".jpg"
        Image.new("RGB", size, colour).save(folder / f"img{i:06d}{ext}")
        (folder / f"img{i:06d}.txt").write_text(f"sks, tag{i % 37}, colour {colour[0]}", encoding="utf-8")


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--workdir", type=Path, default=None, help="reuse generated images here (kept)")
    parser.add_argument("--decode_sample", type=int, default=200, help="images decoded for the decode reference")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    root = args.workdir or Path(tempfile.mkdtemp(prefix="scan_bench_"))
    folder = root / "1_sks"
    if len(list(folder.glob("img*.txt"))) != args.images:
        shutil.rmtree(folder, ignore_errors=True)
        seconds, _ = timed(lambda: write_images(folder, args.images))
        print(f"wrote {args.images} images in {seconds:.1f} s")
    fallbacks = {"resolution": 1024, "batch_size": 4, "enable_bucket": True, "caption_extension": ".txt",
                 "min_bucket_reso": 256, "max_bucket_reso": 2048}  # fmt: skip
    scan, group = timed(lambda: build_dataset_group(DatasetOptions(train_data_dir=root, fallbacks=fallbacks)))
    images = sorted(p for p in folder.iterdir() if p.suffix in (".png", ".jpg"))
    read_all, _ = timed(lambda: sum(len(p.read_bytes()) for p in images))
    sample = images[: args.decode_sample]
    decode, _ = timed(lambda: [Image.open(p).load() for p in sample])
    decode_all = decode * len(images) / len(sample)
    print(f"images: {len(images)}, buckets: {len(group.datasets[0].buckets)}, batches per epoch: {len(group)}")
    print(f"scan + bucket (ours):           {scan:7.2f} s  ({len(images) / scan:,.0f} images/s)")
    print(f"reference, read every file:     {read_all:7.2f} s  -> ours / read   = {scan / read_all:.2f}")
    print(f"reference, PIL decode (scaled): {decode_all:7.2f} s  -> ours / decode = {scan / decode_all:.3f}")
    if args.workdir is None:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
