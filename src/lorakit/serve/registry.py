"""The adapters a server offers: names, safe paths inside the adapters folder, and the resident LRU.

Each subfolder of the adapters folder holding adapter_config.json is an adapter served under the
folder's name. At most `max_loaded` are attached to the model at once (resident), least recently
used evicted first (never one a running request uses). An adapter not resident is read from its
safetensors file (never a pickle) on a loader thread while the engine keeps stepping, and attached
by the engine thread between steps (every change to the model happens there).

Paths cannot leave the folder: adapter names are plain folder names, and a path given to the load
call must be relative, hold no '..', and resolve (symlinks followed) inside the folder.
"""

from __future__ import annotations

import collections
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from ..adapters import files, manage
from ..config import LoraConfig
from ..errors import LorakitError
from ..layers import BASE

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


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
    problems = []
    if config.use_dora:
        problems.append("it is DoRA (serving mixes plain LoRA adapters only; merge it into a model instead)")
    if config.bias != "none":
        problems.append(f"it trains biases (bias={config.bias!r}), which would change the base for everyone")
    if config.modules_to_save:
        problems.append(f"it replaces whole modules (modules_to_save={config.modules_to_save})")
    files.refuse_non_finite(path, tensors)
    LorakitError.collect(problems, f"adapter {path.name!r} cannot be served:")
    return config, tensors


class Registry:
    """Adapter name -> folder; resident adapters in an LRU of max_loaded; loads off the engine thread."""

    def __init__(self, model, root: str | Path | None, base_name: str, max_loaded: int = 8):
        self.model, self.base_name, self.max_loaded = model, base_name, max(1, max_loaded)
        self.root = Path(root).resolve() if root is not None else None
        self.available: dict[str, Path] = {}
        self.resident: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.reads: dict[str, Future] = {}
        self.skipped: dict[str, str] = {}  # folder -> why it is not served
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="lorakit-adapter-read")
        if self.root is not None:
            self.scan()

    def scan(self) -> None:
        if not self.root.is_dir():
            raise LorakitError(f"--adapters {str(self.root)!r} is not a folder")
        for sub in sorted(self.root.iterdir()):
            if not (sub / "adapter_config.json").is_file():
                continue
            try:
                self.check_name(sub.name)
                path = inside(self.root, sub.name)
                LoraConfig.load(path)
            except LorakitError as e:
                self.skipped[sub.name] = str(e)
                continue
            with self._lock:
                self.available.setdefault(sub.name, path)

    def check_name(self, name: str) -> None:
        if not isinstance(name, str) or not NAME_RE.match(name) or name in (self.base_name, BASE):
            raise LorakitError(f"lora_name {name!r} must be 1-64 letters, digits, '.', '_' or '-' (not starting "
                               f"with a symbol) and differ from the base model's name {self.base_name!r}")

    def names(self) -> list[str]:
        with self._lock:
            return list(self.available)

    def resolve(self, model_name: str) -> str:
        """BASE for the base model's name, else the adapter of that name; NotFound names what exists."""
        if model_name == self.base_name:
            return BASE
        with self._lock:
            if model_name in self.available:
                return model_name
            offered = [self.base_name, *self.available]
        raise NotFound(f"The model `{model_name}` does not exist. Available models: {offered}")

    # -- on the engine thread ----------------------------------------------------------------------------

    def touch(self, name: str) -> None:
        if name in self.resident:
            self.resident.move_to_end(name)

    def ready(self, name: str, engine) -> bool:
        """Whether adapter `name` is attached; if not, start (or finish) its load. Raises LorakitError
        when it cannot be loaded (the engine fails the requests that wanted it)."""
        if name in self.resident:
            return True
        future = self.reads.get(name)
        if future is None:
            with self._lock:
                path = self.available.get(name)
            if path is None:
                raise NotFound(f"adapter {name!r} was unloaded")
            future = self.reads[name] = self._pool.submit(read_for_serving, path)
            future.add_done_callback(lambda _: engine.inbox.put(("wake", None)))
            return False
        if not future.done():
            return False
        del self.reads[name]
        config, tensors = future.result()  # raises the read's LorakitError
        if not self.attach(name, config, tensors, engine):
            self.reads[name] = future  # no room yet: keep what was read, retry next step
            return False
        return True

    def attach(self, name: str, config, tensors: dict, engine) -> bool:
        """Attach a read adapter (engine thread), evicting the least recently used idle one if full;
        False when every resident adapter is in use."""
        if name in self.resident:
            return True
        if not self._make_room(engine):
            return False
        with self._lock:
            path = self.available.get(name, name)
        files.attach_adapter(self.model, config, tensors, path, name, activate=False)
        self.resident[name] = None
        return True

    def unload(self, name: str, engine) -> None:
        """Stop serving `name` (engine thread); refused while running requests use it."""
        busy = sum(r.adapter == name for r in engine.running)
        if busy:
            raise LorakitError(f"adapter {name!r} is in use by {busy} running request(s); retry when they finish")
        self.remove(name)
        self.detach(name)

    def _make_room(self, engine) -> bool:
        busy = {r.adapter for r in engine.running}
        while len(self.resident) >= self.max_loaded:
            victim = next((n for n in self.resident if n not in busy), None)
            if victim is None:
                return False
            self.detach(victim)
        return True

    def detach(self, name: str) -> None:
        if name in self.resident:
            manage.delete_adapter(self.model, name)
            del self.resident[name]

    def add(self, name: str, path: Path) -> None:
        with self._lock:
            self.available[name] = path

    def remove(self, name: str) -> None:
        with self._lock:
            self.available.pop(name, None)
        self.reads.pop(name, None)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
