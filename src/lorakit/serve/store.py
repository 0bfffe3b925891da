"""The adapter store's two outer tiers: adapter folders on disk (watched) and read adapters in host memory.

    Catalog     name -> folder under the adapters DIR. A rescan (every `rescan_s`, on a watcher thread)
                finds new folders and drops gone ones; a name not in the catalog is also looked up on
                disk when a request asks for it, so a new folder is servable at once.
    fingerprint what a read adapter is valid for: (mtime_ns, size, inode) of adapter_config.json and
                adapter_model.safetensors. Checked on every use (two stat calls), so a changed folder
                is never served stale: a changed fingerprint is a different adapter version.
    HostCache   read adapters (config + CPU tensors), least recently used evicted first, bounded in
                bytes of tensor data (`--host-cache-bytes`). An adapter larger than the whole budget
                is not kept (it is read again when needed).
    Loader      background threads (4: one slow folder never holds up the others) reading folders into the
                host cache (never on the engine's thread);
                one read per (name, fingerprint) at a time; a failed read is remembered for that
                fingerprint (a broken folder fails its requests fast) and retried once the folder changes.

The third tier, adapters attached to the model for compute, is registry.py's resident set.
"""

from __future__ import annotations

import collections
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..adapters.files import BIN_NAME, WEIGHTS_NAME
from ..config import CONFIG_NAME, LoraConfig
from ..errors import LorakitError


def fingerprint(path: Path) -> tuple | None:
    """(mtime_ns, size, inode) of the config and the weights; None when the folder has no config."""
    out = []
    for name in (CONFIG_NAME, WEIGHTS_NAME, BIN_NAME):  # a folder may hold its tensors in either file
        try:
            st = os.stat(path / name)
        except OSError:
            if name == CONFIG_NAME:
                return None
            out.append(None)  # weights missing: the read fails with a message naming the file
            continue
        out.append((st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(out)


@dataclass
class Read:
    """One adapter version read from disk: its config and CPU tensors."""
    config: object
    tensors: dict
    fingerprint: tuple
    nbytes: int


def nbytes(tensors: dict) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


class HostCache:
    """name -> Read, LRU, total tensor bytes at most `capacity` (thread safe)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.bytes = 0
        self.peak = 0
        self._items: collections.OrderedDict[str, Read] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, name: str, fp: tuple) -> Read | None:
        with self._lock:
            item = self._items.get(name)
            if item is None or item.fingerprint != fp:
                return None
            self._items.move_to_end(name)
            return item

    def put(self, name: str, item: Read) -> None:
        with self._lock:
            self._drop(name)
            if item.nbytes > self.capacity:
                return
            while self._items and self.bytes + item.nbytes > self.capacity:
                self._drop(next(iter(self._items)))
            self._items[name] = item
            self.bytes += item.nbytes
            self.peak = max(self.peak, self.bytes)

    def drop(self, name: str) -> None:
        with self._lock:
            self._drop(name)

    def _drop(self, name: str) -> None:
        old = self._items.pop(name, None)
        if old is not None:
            self.bytes -= old.nbytes

    def __len__(self) -> int:
        return len(self._items)


class Loader:
    """Reads adapter folders into a HostCache on a background thread; `read` is a function(path) ->
    (config, tensors) raising LorakitError for a folder that cannot be served."""

    def __init__(self, cache: HostCache, read, threads: int = 4):
        self.cache, self._read = cache, read
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="lorakit-adapter-load")
        self._pending: dict[tuple, Future] = {}  # (name, fingerprint) -> the read in flight
        self._failed: dict[tuple, str] = {}  # (name, fingerprint) -> why it cannot be served
        self._lock = threading.Lock()
        self.reads = 0

    def failure(self, name: str, fp: tuple) -> str | None:
        with self._lock:
            return self._failed.get((name, fp))

    def request(self, name: str, path: Path, fp: tuple, done=None) -> None:
        """Start reading `name` at version `fp` unless cached, failed or already in flight; `done()` is
        called (on the loader thread) when the read ends."""
        key = (name, fp)
        with self._lock:
            if key in self._failed or key in self._pending or self.cache.get(name, fp) is not None:
                return
            future = self._pending[key] = self._pool.submit(self._load, name, path, fp)
        if done is not None:
            future.add_done_callback(lambda _: done())

    def _load(self, name: str, path: Path, fp: tuple) -> None:
        try:
            config, tensors = self._read(path)
            size = nbytes(tensors)
            if size > self.cache.capacity:
                raise LorakitError(f"adapter {name!r} takes {size} bytes, more than the host cache "
                                   f"(--host-cache-bytes {self.cache.capacity}); raise it")
            after = fingerprint(path)
            if after != fp:  # written while we read: read the new version when it is asked for
                raise _Changed()
            self.cache.put(name, Read(config, tensors, fp, size))
            self.reads += 1
        except _Changed:
            pass
        except LorakitError as e:
            with self._lock:
                self._failed = {k: v for k, v in self._failed.items() if k[0] != name}  # one version kept
                self._failed[(name, fp)] = str(e)
        except Exception as e:  # an unexpected reader error is still this folder's problem only
            with self._lock:
                self._failed[(name, fp)] = f"adapter {name!r} could not be read: {type(e).__name__}: {e}"
        finally:
            with self._lock:
                self._pending.pop((name, fp), None)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class _Changed(Exception):
    pass


class Catalog:
    """The adapter folders under `root`: name -> path, rescanned by `watch()`; `check(name)` -> a reason
    the folder name cannot be served, or None."""

    def __init__(self, root: Path, check, inside):
        self.root, self._check, self._inside = root, check, inside
        self.paths: dict[str, Path] = {}  # scanned folders
        self.pinned: dict[str, Path] = {}  # added by the load endpoint (any name, a path inside root)
        self.hidden: set[str] = set()  # unloaded by the unload endpoint: not rescanned back
        self.skipped: dict[str, str] = {}  # folder -> why it is not served
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.on_change = None  # callable(name) for a folder whose fingerprint changed or that went away
        self._seen: dict[str, tuple] = {}
        self._verdicts: dict[str, tuple] = {}  # folder -> (fingerprint, why not served or None)

    def scan(self) -> None:
        if not self.root.is_dir():
            raise LorakitError(f"--adapters {str(self.root)!r} is not a folder")
        found, skipped = {}, {}
        for sub in sorted(self.root.iterdir()):
            if not (sub / CONFIG_NAME).is_file():
                continue
            why = self._why_not(sub.name)
            if why is None:
                found[sub.name] = self.root / sub.name
            else:
                skipped[sub.name] = why
        with self._lock:
            self.paths = {n: p for n, p in found.items() if n not in self.hidden}
            self.skipped = skipped
            names = list(self.paths) + list(self.pinned)
        self._changes(names)

    def _why_not(self, name: str) -> str | None:
        """Why folder `name` cannot be served (a bad name, a path leaving root, an unreadable config),
        remembered per fingerprint so a rescan parses only new and changed configs."""
        fp = fingerprint(self.root / name)
        hit = self._verdicts.get(name)
        if hit is not None and hit[0] == fp and fp is not None:
            return hit[1]
        try:
            self._check(name)
            LoraConfig.load(self._inside(self.root, name))
            why = None
        except LorakitError as e:
            why = str(e)
        self._verdicts[name] = (fp, why)
        return why

    def why_not(self, name: str) -> str | None:
        """Why the folder `name` under root is not served, or None (also when there is no such folder)."""
        if not (self.root / name / CONFIG_NAME).is_file():
            return None
        return self._why_not(name)

    def _changes(self, names: list[str]) -> None:
        seen = {}
        for n in names:
            path = self.path(n)
            if path is not None:
                seen[n] = fingerprint(path)
        gone = [n for n, fp in self._seen.items() if seen.get(n) != fp]
        self._seen = seen
        if self.on_change is not None:
            for n in gone:
                self.on_change(n)

    def path(self, name: str) -> Path | None:
        """The folder of `name`; a folder not yet scanned is looked up on disk (and added) right away."""
        with self._lock:
            path = self.pinned.get(name) or self.paths.get(name)
        if path is not None and not (path / CONFIG_NAME).is_file():  # removed since the last scan
            with self._lock:
                self.paths.pop(name, None)
            return None
        if path is not None or name in self.hidden:
            return path
        sub = self.root / name if isinstance(name, str) and name else None
        if sub is None or not (sub / CONFIG_NAME).is_file() or self._why_not(name) is not None:
            return None
        with self._lock:
            self.paths[name] = sub
        return sub

    def names(self) -> list[str]:
        with self._lock:
            return list(dict.fromkeys([*self.paths, *self.pinned]))

    def pin(self, name: str, path: Path) -> None:
        with self._lock:
            self.pinned[name] = path
            self.hidden.discard(name)

    def hide(self, name: str) -> None:
        with self._lock:
            self.pinned.pop(name, None)
            self.paths.pop(name, None)
            self.hidden.add(name)

    def watch(self, every_s: float) -> None:
        """Rescan every `every_s` seconds on a daemon thread until close()."""
        def loop():
            while not self._stop.wait(every_s):
                try:
                    self.scan()
                except LorakitError:
                    pass  # the folder went away; requests for its adapters get their 404s
        self._thread = threading.Thread(target=loop, name="lorakit-adapter-watch", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
