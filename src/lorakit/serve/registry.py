"""The adapters a server offers: names, safe paths inside the adapters folder, and the resident tier.

Each subfolder of the adapters folder holding adapter_config.json is an adapter served under the
folder's name. Three tiers (S-LoRA's): every folder on disk (store.Catalog, watched: a new folder is
servable without a restart), read adapters in host memory (store.HostCache, an LRU bounded in bytes),
and the resident set attached to the model for compute: at most `max_loaded` adapters and/or
`max_loaded_bytes` of adapter tensors, least recently used evicted first (never one a running
request uses). Reads happen on the loader thread (store.Loader), started when a request arrives;
attaching happens on the engine thread between steps (every change to the model happens there), and
a request waits only for its own adapter.

Versions: a read is valid for its folder's fingerprint (store.fingerprint), checked each time a
request starts. A changed folder is a new version: it is attached under a fresh internal slot name
(`lkN`) next to the old one, which requests already running keep using until they finish, and which
is evicted first afterwards. So a request never runs on weights older than its folder was when it
started, and no request sees its weights change mid-way.

Paths cannot leave the folder: adapter names are plain folder names, and a path given to the load
call must be relative, hold no '..', and resolve (symlinks followed) inside the folder.
"""

from __future__ import annotations

import collections
import itertools
import re
from dataclasses import dataclass
from pathlib import Path

from ..adapters import files, slots
from ..config import LoraConfig
from ..errors import LorakitError
from ..layers import BASE
from .store import Catalog, HostCache, Loader, Read, fingerprint, nbytes

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*$", re.IGNORECASE)
UNITS = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9, "T": 1e12, "TB": 1e12,
         "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40, "KI": 1 << 10, "MI": 1 << 20, "GI": 1 << 30}


def parse_bytes(text: str | int) -> int:
    """'512MB', '2GiB' (units: B, K/KB/M/MB/G/GB/T/TB in 1000s, KiB/MiB/GiB/TiB in 1024s) or a plain number of
    bytes -> int; a LorakitError naming the form otherwise."""
    if isinstance(text, int):
        return text
    m = SIZE_RE.match(str(text))
    if not m or m.group(2).upper() not in UNITS:
        raise LorakitError(f"{text!r} is not a size: give bytes as a number with an optional unit, e.g. 512MB, "
                           "2GiB, 1048576")
    return int(float(m.group(1)) * UNITS[m.group(2).upper()])


def parse_resident(text: str | int) -> tuple[int | None, int | None]:
    """--max-loaded: a count of adapters ('64') or a size in bytes with a unit ('256MB') -> (count, bytes)."""
    if isinstance(text, int) or str(text).strip().isdigit():
        count = int(text)
        if count < 1:
            raise LorakitError(f"--max-loaded {text!r} must be at least 1 adapter")
        return count, None
    return None, parse_bytes(text)


class NotFound(LorakitError):
    """A model or adapter name the server does not offer (HTTP 404)."""


def inside(root: Path, relative: str) -> Path:
    """root/relative resolved, refusing absolute paths, '..' and anything (symlinks included) outside root."""
    if not isinstance(relative, str) or not relative or "\x00" in relative:
        raise LorakitError("lora_path must be a non-empty folder path relative to the adapters folder")
    given = Path(relative)
    if given.is_absolute() or ".." in given.parts:
        raise LorakitError(f"lora_path {relative!r} must be relative to the adapters folder, without '..'")
    real_root = root.resolve()
    try:
        path = (real_root / given).resolve(strict=True)
    except (OSError, RuntimeError):
        raise NotFound(f"lora_path {relative!r} does not exist in the adapters folder") from None
    if not path.is_relative_to(real_root) or path == real_root:
        raise LorakitError(f"lora_path {relative!r} resolves outside the adapters folder; refused")
    return path


def read_for_serving(path: Path) -> tuple[LoraConfig, dict]:
    """An adapter folder's config and tensors, refusing what one forward cannot serve per token."""
    config, tensors = files.read_adapter(path)
    if config.velora_config is not None:  # VeLoRA changes A's backward only: at inference it is plain LoRA
        config = config.replace(velora_config=None)
        tensors = {k: v for k, v in tensors.items() if not k.endswith(".lora_velora_embed")}
    problems = []
    if config.use_dora:
        problems.append("it is DoRA (serving mixes plain LoRA adapters only; merge it into a model instead)")
    if config.bias != "none":
        problems.append(f"it trains biases (bias={config.bias!r}), which would change the base for everyone")
    if config.modules_to_save:
        problems.append(f"it replaces whole modules (modules_to_save={config.modules_to_save})")
    if config.kasa_config is not None:
        problems.append("it is KaSA, which truncates the base weights (merge it into a model instead)")
    if config.trainable_token_indices is not None:
        problems.append("it replaces embedding rows (trainable_token_indices) for everyone (merge it instead)")
    files.refuse_non_finite(path, tensors)
    LorakitError.collect(problems, f"adapter {path.name!r} cannot be served:")
    return config, tensors


@dataclass
class Slot:
    """An adapter version attached to the model under an internal name."""
    name: str  # the served name
    fingerprint: tuple
    nbytes: int
    rank: int


class Registry:
    """Served names -> folders (disk), read adapters (host LRU), attached versions (resident LRU)."""

    def __init__(self, model, root: str | Path | None, base_name: str, max_loaded: int | None = 8,
                 max_loaded_bytes: int | None = None, host_cache_bytes: int = 1 << 30, rescan_s: float | None = None):
        self.model, self.base_name = model, base_name
        self.max_loaded = None if max_loaded is None else max(1, max_loaded)
        self.max_loaded_bytes = max_loaded_bytes
        self.root = Path(root).resolve() if root is not None else None
        self.host = HostCache(host_cache_bytes)
        self.loader = Loader(self.host, read_for_serving)
        self.resident: collections.OrderedDict[str, Slot] = collections.OrderedDict()  # slot name -> Slot, LRU first
        self.current: dict[str, str] = {}  # served name -> the slot of its newest attached version
        self.resident_bytes = 0
        self.attaches = 0
        self.no_room = False  # the last ready() found its adapter read but every resident slot busy
        self._ids = itertools.count(1)
        self.catalog = None
        if self.root is not None:
            self.catalog = Catalog(self.root, self.check_name, inside)
            self.catalog.on_change = self.host.drop  # a changed or gone folder: free its stale host copy
            self.catalog.scan()
            if rescan_s:
                self.catalog.watch(rescan_s)

    @property
    def skipped(self) -> dict[str, str]:
        return self.catalog.skipped if self.catalog is not None else {}

    def scan(self) -> None:
        if self.catalog is not None:
            self.catalog.scan()

    def check_name(self, name: str) -> None:
        if not isinstance(name, str) or not NAME_RE.match(name) or name in (self.base_name, BASE):
            raise LorakitError(f"lora_name {name!r} must be 1-64 letters, digits, '.', '_' or '-' (not starting "
                               f"with a symbol) and differ from the base model's name {self.base_name!r}")

    def names(self) -> list[str]:
        return self.catalog.names() if self.catalog is not None else []

    def path(self, name: str) -> Path | None:
        return self.catalog.path(name) if self.catalog is not None and NAME_RE.match(name) else None

    def resolve(self, model_name: str) -> str:
        """BASE for the base model's name, else the adapter of that name; NotFound names what exists."""
        if model_name == self.base_name:
            return BASE
        if self.path(model_name) is not None:
            return model_name
        why = self.catalog.why_not(model_name) if self.catalog is not None and NAME_RE.match(model_name) else None
        if why is not None:  # a folder of that name exists but cannot be served
            raise NotFound(f"The model `{model_name}` is not served: {why}")
        offered = [self.base_name, *self.names()]
        shown = offered if len(offered) <= 20 else offered[:20] + [f"... {len(offered) - 20} more (GET /v1/models)"]
        raise NotFound(f"The model `{model_name}` does not exist. Available models: {shown}")

    def failure(self, name: str) -> str | None:
        """Why the current version of `name` failed to read, if it did (any thread)."""
        path = self.path(name)
        fp = fingerprint(path) if path is not None else None
        return self.loader.failure(name, fp) if fp is not None else None

    def prefetch(self, name: str, done=None) -> None:
        """Start reading `name` into host memory unless its current version is resident or cached (any thread)."""
        path = self.path(name)
        fp = fingerprint(path) if path is not None else None
        if fp is None:
            return
        slot = self.resident.get(self.current.get(name, ""))
        if slot is None or slot.fingerprint != fp:
            self.loader.request(name, path, fp, done)

    # -- on the engine thread ----------------------------------------------------------------------------

    def rank(self, slot: str) -> int:
        """The rank of an attached slot (0 for the base): the engine orders a step by it."""
        hit = self.resident.get(slot)
        return hit.rank if hit is not None else 0

    def touch(self, slot: str) -> None:
        if slot in self.resident:
            self.resident.move_to_end(slot)

    def ready(self, name: str, engine, wake=None) -> str | None:
        """The slot running adapter `name` at its folder's current version, or None while it loads (or
        waits for room). Raises LorakitError when it cannot be served (the engine fails that request)."""
        self.no_room = False
        path = self.path(name)
        fp = fingerprint(path) if path is not None else None
        if fp is None:
            raise NotFound(f"adapter {name!r} is no longer served (its folder is gone or it was unloaded)")
        key = self.current.get(name)
        if key is not None and self.resident[key].fingerprint == fp:
            return key
        read = self.host.get(name, fp)
        if read is None:
            why = self.loader.failure(name, fp)
            if why is not None:
                raise LorakitError(why)
            self.loader.request(name, path, fp, wake)
            return None
        return self.attach(name, read, engine)

    def attach(self, name: str, read: Read, engine) -> str | None:
        """Attach a read version of `name` under a new slot, evicting idle slots (stale versions first,
        then least recently used) to fit the resident budget; None when every slot in the way is busy."""
        if self.max_loaded_bytes is not None and read.nbytes > self.max_loaded_bytes:
            raise LorakitError(f"adapter {name!r} takes {read.nbytes} bytes, more than the resident budget "
                               f"--max-loaded {self.max_loaded_bytes} bytes; raise it")
        if not self._make_room(read.nbytes, engine):
            self.no_room = True
            return None
        key = f"lk{next(self._ids)}"
        slots.attach(self.model, read.config, read.tensors, key, self.path(name) or name)
        self.resident[key] = Slot(name, read.fingerprint, read.nbytes, read.config.r)
        self.resident_bytes += read.nbytes
        self.attaches += 1
        self.current[name] = key
        return key

    def _full(self, need: int) -> bool:
        return (self.max_loaded is not None and len(self.resident) >= self.max_loaded) or \
            (self.max_loaded_bytes is not None and self.resident_bytes + need > self.max_loaded_bytes)

    def _make_room(self, need: int, engine) -> bool:
        busy = {r.slot for r in engine.running}
        while self._full(need):
            idle = [k for k in self.resident if k not in busy]
            stale = [k for k in idle if self.current.get(self.resident[k].name) != k]
            if not idle:
                return False
            self.detach((stale or idle)[0])
        return True

    def detach(self, key: str) -> None:
        slot = self.resident.pop(key, None)
        if slot is None:
            return
        slots.detach(self.model, key)
        self.resident_bytes -= slot.nbytes
        if self.current.get(slot.name) == key:
            del self.current[slot.name]

    def unload(self, name: str, engine) -> None:
        """Stop serving `name` (engine thread); refused while running requests use it."""
        busy = sum(r.adapter == name for r in engine.running)
        if busy:
            raise LorakitError(f"adapter {name!r} is in use by {busy} running request(s); retry when they finish")
        self.remove(name)
        for key in [k for k, s in self.resident.items() if s.name == name]:
            self.detach(key)

    def taken(self, name: str, path: Path) -> bool:
        """Whether `name` is already served: loaded by the load endpoint, or a folder of that name other
        than `path` (a folder found in the adapters folder may be loaded under its own name: a warm-up)."""
        if name in self.catalog.pinned:
            return True
        found = self.catalog.path(name)
        return found is not None and found.resolve() != path

    def add(self, name: str, path: Path) -> None:
        """Serve folder `path` (inside the adapters folder) under `name` (the load endpoint)."""
        self.catalog.pin(name, path)

    def load_now(self, name: str, path: Path) -> None:
        """Read and check `path` for `name` now, into host memory (raises LorakitError); any thread."""
        fp = fingerprint(path)
        config, tensors = read_for_serving(path)
        if fp is not None:
            self.host.put(name, Read(config, tensors, fp, nbytes(tensors)))

    def remove(self, name: str) -> None:
        if self.catalog is not None:
            self.catalog.hide(name)
        self.host.drop(name)

    def close(self) -> None:
        self.loader.close()
        if self.catalog is not None:
            self.catalog.close()
