"""Following an index as it is republished: the versions a serving process holds, loaded in the
background and swapped between two requests.

A process that serves an index (a retriever replica) keeps the newest version it has loaded and
the one before (requests that started on it finish on it); a poll (``start``) loads a newly
published version beside them — only the shards that changed: the others are taken over
(:meth:`ShardedIndex.load` ``reuse``) — and verifies it before it is offered. A request names the
version it wants (:meth:`get`), so an answer gathered from several processes never mixes versions;
one this process does not hold yet is loaded on demand.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict

from pipeline.index.reader import ShardedIndex
from pipeline.index.versions import read_version
from pipeline.storage import Location

logger = logging.getLogger(__name__)


class FollowedIndex:
    """The versions of one index a process serves.

    Args:
        where: the index folder or object store URI.
        keep: versions held at most (the newest ones used).
        shards: the shard numbers this process serves (None: all of every version).
        new_shards: also serve the shards a later version adds beyond every number in ``shards``
            (the last of a service's retriever groups takes them).
        load: other :meth:`ShardedIndex.load` arguments (``expect_models``, ...).
    """

    def __init__(self, where: str | Location, keep: int = 2, shards: list[int] | None = None,
                 new_shards: bool = False, **load) -> None:
        self.where = Location(where)
        self.keep = max(1, keep)
        self._shards = None if shards is None else sorted(shards)
        self._new_shards = new_shards
        self._load = load
        self._lock = threading.Lock()  # one load at a time; readers never wait on it for a held version
        self._held: OrderedDict[int, ShardedIndex] = OrderedDict()
        self._stop = threading.Event()
        first = self._load_version(None)
        self._held[first.version] = first
        self.latest = first.version

    @property
    def current(self) -> ShardedIndex:
        return self._held[self.latest]

    def held(self) -> list[int]:
        return sorted(self._held)

    def get(self, version: int | None = None) -> ShardedIndex:
        """The index at ``version`` (None: the newest held), loaded now when not held."""
        if version is None:
            return self.current
        found = self._held.get(version)
        if found is not None:
            return found
        with self._lock:
            if version not in self._held:
                self._add(self._load_version(version, reuse=self.current))
            return self._held[version]

    def shards_of(self, manifest) -> list[int] | None:
        """The shard numbers of ``manifest`` this process serves (None: all)."""
        if self._shards is None:
            return None
        mine = [n for n in self._shards if n < len(manifest.shards)]
        if self._new_shards:
            mine += list(range(max(self._shards, default=-1) + 1, len(manifest.shards)))
        return mine

    def _load_version(self, version: int | None, reuse: ShardedIndex | None = None) -> ShardedIndex:
        manifest = read_version(self.where, version)
        return ShardedIndex.load(self.where, version=manifest.version, shards=self.shards_of(manifest),
                                 reuse=reuse, **self._load)

    def refresh(self) -> int | None:
        """Loads the published version when it is newer than every held one; returns it, or None
        when there was nothing new. A version that fails to load is logged and tried again at the
        next refresh; the held ones keep serving."""
        try:
            published = read_version(self.where).version
        except (OSError, ValueError) as exc:
            logger.warning("index %s: cannot read its pointer (%s); still serving version %d",
                           self.where, exc, self.latest)
            return None
        if published <= self.latest:
            return None
        try:
            self.get(published)
        except (OSError, ValueError) as exc:
            logger.error("index %s: version %d does not load (%s); still serving version %d",
                         self.where, published, exc, self.latest)
            return None
        return published

    def _add(self, index: ShardedIndex) -> None:
        self._held[index.version] = index
        self.latest = max(self._held)
        while len(self._held) > self.keep:  # drop the oldest version (never the newest)
            dropped = min(self._held)
            del self._held[dropped]
        logger.info("index %s: version %d loaded (%d images); holding %s",
                    self.where, index.version, len(index), self.held())

    def start(self, interval_s: float) -> threading.Thread | None:
        """Refreshes every ``interval_s`` seconds in a daemon thread (None: 0 turns it off)."""
        if interval_s <= 0:
            return None
        thread = threading.Thread(target=self._follow, args=(interval_s,), daemon=True, name="index-follow")
        thread.start()
        return thread

    def _follow(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            self.refresh()

    def stop(self) -> None:
        self._stop.set()
