"""Label spaces: every class index a classifier predicts gets a stable id (a WordNet synset for
ImageNet) and a human-readable name. The ImageNet lists ship inside timm, so nothing is downloaded."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

from timm.data import ImageNetInfo

#: Label spaces known by name, and the class count each has.
IMAGENET_SPACES = {
    "imagenet-1k": 1000,
    "imagenet-12k": 11821,
    "imagenet-22k": 21841,
    "imagenet-22k-ms": 21842,
    "imagenet-21k-goog": 21843,
}


@dataclass(frozen=True)
class LabelSpace:
    """An ordered list of classes.

    Attributes:
        name: the label space's name, e.g. ``imagenet-22k``; ``generic-N`` when unknown.
        ids: the class ids by index (WordNet synsets such as ``n02123045`` for ImageNet).
        names: human-readable names by index.
    """

    name: str
    ids: tuple[str, ...]
    names: tuple[str, ...]
    _index: dict[str, int] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.names):
            raise ValueError(f"label space {self.name!r}: {len(self.ids)} ids but {len(self.names)} names")
        if not self.ids:
            raise ValueError(f"label space {self.name!r} is empty")
        object.__setattr__(self, "_index", {class_id: i for i, class_id in enumerate(self.ids)})

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, class_id: object) -> bool:
        return class_id in self._index

    def get(self, class_id: str, default: int) -> int:
        """The index of a class id, or ``default`` when it is not in this label space."""
        return self._index.get(class_id, default)

    def id_of(self, index: int) -> str:
        """The class id (synset) at ``index``."""
        return self.ids[index]

    def name_of(self, index: int) -> str:
        """The human-readable name at ``index``."""
        return self.names[index]

    def index_of(self, class_id: str) -> int:
        """The index of a class id.

        Raises:
            KeyError: the id is not in this label space.
        """
        try:
            return self._index[class_id]
        except KeyError:
            raise KeyError(f"{class_id!r} is not a class of label space {self.name!r}") from None


@lru_cache(maxsize=None)
def load_label_space(name: str) -> LabelSpace:
    """Loads a named label space.

    Args:
        name: one of :data:`IMAGENET_SPACES`, or ``generic-N`` for N anonymous classes.

    Raises:
        ValueError: the name is unknown.
    """
    if name.startswith("generic-") and name[len("generic-") :].isdigit():
        n = int(name[len("generic-") :])
        ids = tuple(f"class_{i}" for i in range(n))
        return LabelSpace(name=name, ids=ids, names=ids)
    if name not in IMAGENET_SPACES:
        raise ValueError(f"unknown label space {name!r}; expected one of {sorted(IMAGENET_SPACES)} or generic-N")
    info = ImageNetInfo(name)
    synsets = tuple(info.label_names())
    names = tuple(info.label_name_to_description(s) for s in synsets)
    return LabelSpace(name=name, ids=synsets, names=names)


def label_space_for(num_classes: int) -> LabelSpace:
    """The label space a classifier with ``num_classes`` outputs predicts in.

    ImageNet variants are recognised by their class count (as timm does); other counts get a
    generic space whose ids are ``class_<i>``.
    """
    for name, count in IMAGENET_SPACES.items():
        if count == num_classes:
            return load_label_space(name)
    return load_label_space(f"generic-{num_classes}")
