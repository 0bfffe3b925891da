"""Trainable tokens (PEFT's trainable_token_indices): train only chosen rows of an embedding, per adapter.

For new special tokens (a chat template's) the embedding rows of those ids must learn, but training the
whole (vocab, dim) matrix costs memory and file size. Per adapter a TokenLayer keeps
    trainable_tokens_delta[name]     (k, dim) Parameter: the rows' values (PEFT's name: they are values,
                                     not differences; initialised as a copy of the base rows)
    trainable_tokens_original[name]  (k, dim) buffer: the base rows, to unmerge
    token_indices[name]              the k row ids
and its forward looks ids up in W with those rows replaced (index_copy), so gradients reach only the
chosen rows. Where the output embedding is tied to the input one (tie_word_embeddings), a second
TokenLayer on the output head shares the first one's dicts, so the same rows serve both (and are saved
once). The module tree and keys are PEFT's: <emb> becomes a TokenWrapper whose `token_adapter` holds
base_layer and the dicts; on disk the rows are <emb>.token_adapter.trainable_tokens_delta.

Merging writes the rows into the base weight (index_copy); unmerging writes the originals back. Adapters
that share a layer must choose disjoint rows to be active or merged together (PEFT's rule); only one
adapter with trainable tokens may be active in a layer at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LorakitError

DELTA = "trainable_tokens_delta"


class _Buffers(nn.Module):
    """name -> tensor, registered as non-persistent buffers (as PEFT's BufferDict: they move with .to() but stay
    out of the state dict; the originals are the base weight's rows, which the base checkpoint holds)."""

    def __setitem__(self, name: str, t: torch.Tensor) -> None:
        self.register_buffer(name, t, persistent=False)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._buffers[name]

    def __delitem__(self, name: str) -> None:
        del self._buffers[name]

    def __contains__(self, name: str) -> bool:
        return name in self._buffers

    def __iter__(self):
        return iter(self._buffers)

    def __len__(self) -> int:
        return len(self._buffers)


class TokenLayer(nn.Module):
    """An nn.Embedding (or an output head nn.Linear) whose chosen rows are replaced per adapter."""

    def __init__(self, base_layer: nn.Module, tied: "TokenLayer | None" = None):
        super().__init__()
        if not isinstance(base_layer, (nn.Embedding, nn.Linear)):
            raise LorakitError(f"trainable_token_indices targets a {type(base_layer).__name__}; it works on "
                               "nn.Embedding layers (and an output head tied to one); name an embedding layer")
        self.base_layer = base_layer
        self._tied = [tied] if tied is not None else []  # a list: not a submodule, not in the state dict
        self.trainable_tokens_delta = tied.trainable_tokens_delta if tied else nn.ParameterDict()
        self.trainable_tokens_original = tied.trainable_tokens_original if tied else _Buffers()
        self.token_indices: dict[str, list[int]] = tied.token_indices if tied else {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False

    @property
    def tied_adapter(self) -> "TokenLayer | None":
        return self._tied[0] if self._tied else None

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def add(self, name: str, indices: list[int]) -> None:
        """Adapter `name` trains rows `indices`, starting from their base values (no RNG drawn)."""
        if self.tied_adapter is not None:  # the rows live in the tied layer's dicts
            return
        W = self.base_layer.weight
        bad = [i for i in indices if not 0 <= i < W.shape[0]]
        if bad:
            raise LorakitError(f"trainable_token_indices {bad} are outside this embedding's {W.shape[0]} rows; "
                               "resize the embeddings first (model.resize_token_embeddings) or fix the ids")
        originals = W.detach()[torch.tensor(indices, device=W.device)]  # (k, dim)
        self.token_indices[name] = list(indices)
        self.trainable_tokens_delta[name] = nn.Parameter(originals.clone())
        self.trainable_tokens_original[name] = originals.clone()

    def delete(self, name: str) -> None:
        if self.tied_adapter is None and name in self.trainable_tokens_delta:
            del self.trainable_tokens_delta[name]
            del self.trainable_tokens_original[name]
            del self.token_indices[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def check_disjoint(self, names: list[str]) -> None:
        seen: set[int] = set()
        for name in dict.fromkeys(self.merged_adapters + names):
            rows = set(self.token_indices[name])
            if seen & rows:
                raise LorakitError(f"Token indices of adapter {name} are already defined and would result in "
                                   "undefined merging behavior. Only disjunct token indices are currently supported.")
            seen |= rows

    def merged_weight(self, names: list[str], W: torch.Tensor | None = None) -> torch.Tensor:
        """W (default: the base weight) with each adapter's rows in place, (rows, dim), differentiable."""
        W = self.base_layer.weight if W is None else W
        for name in names:
            index = torch.tensor(self.token_indices[name], device=W.device)
            W = W.index_copy(0, index, self.trainable_tokens_delta[name].to(W))
        return W

    @torch.no_grad()
    def merge(self, names: list[str] | None = None, safe: bool = False) -> None:
        names = [n for n in (names if names is not None else self.active_adapters)
                 if n in self.token_indices and n not in self.merged_adapters]
        if not names:
            return
        self.check_disjoint(names)
        W = self.base_layer.weight.data
        for name in names:
            W = self.merged_weight([name], W)
            if safe and not torch.isfinite(W).all():
                raise LorakitError(f"merging adapter {name!r} would put NaN/Inf into the embedding rows "
                                   f"{self.token_indices[name]}; the adapter is broken")
        self.base_layer.weight.data = W
        self.merged_adapters += names

    @torch.no_grad()
    def unmerge(self) -> None:
        W = self.base_layer.weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            index = torch.tensor(self.token_indices[name], device=W.device)
            W.data.index_copy_(0, index, self.trainable_tokens_original[name].to(W))

    def live(self) -> list[str]:
        return [n for n in self.active_adapters if n in self.token_indices]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        live = self.live()
        if self.disabled or not live:
            if self.merged_adapters:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged_adapters:
            return self.base_layer(x, *args, **kwargs)
        self.check_disjoint(live)
        W = self.merged_weight(live)
        b = self.base_layer
        if isinstance(b, nn.Linear):  # a tied output head; PEFT's F.linear takes no bias
            return F.linear(x, W)
        out = F.embedding(x, W, padding_idx=b.padding_idx, max_norm=b.max_norm, norm_type=b.norm_type,
                          scale_grad_by_freq=b.scale_grad_by_freq, sparse=b.sparse)
        scale = getattr(b, "embed_scale", None)  # Gemma-style scaled embeddings
        if isinstance(scale, (int, float)) or (isinstance(scale, torch.Tensor) and scale.numel() == 1):
            out = out * torch.as_tensor(scale, device=out.device).to(out.dtype)
        return out


class TokenWrapper(nn.Module):
    """What replaces the embedding module in the model (PEFT's TrainableTokensWrapper): `token_adapter`
    does the work; `.weight` reads the merged weight, as models that look at their embedding's weight need."""

    def __init__(self, base_layer: nn.Module, tied: TokenLayer | None = None):
        super().__init__()
        self.token_adapter = TokenLayer(base_layer, tied)

    @property
    def original_module(self) -> nn.Module:
        return self.token_adapter.base_layer

    @property
    def weight(self) -> torch.Tensor:
        return self.token_adapter.merged_weight(self.token_adapter.live())

    @property
    def active_adapter(self) -> str | None:
        live = self.token_adapter.live()
        return live[0] if live else None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.token_adapter(x, *args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # num_embeddings, embedding_dim, padding_idx, ... of the base layer
            return getattr(super().__getattr__("token_adapter").base_layer, name)


# -- on a model ------------------------------------------------------------------------------------------


def token_layers(model: nn.Module):
    """(name, TokenLayer) for every wrapped embedding (tied ones included), in model order."""
    for name, mod in model.named_modules():
        if isinstance(mod, TokenLayer):
            yield name, mod


def tied_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Names ('<module>.') of wrappers whose rows belong to another (tied) one: they are saved once, there."""
    return tuple(f"{name.rpartition('.')[0]}." for name, layer in token_layers(model) if layer.tied_adapter is not None)


def _targets(model: nn.Module, config) -> dict[str, list[int]]:
    spec = config.trainable_token_indices
    if isinstance(spec, dict):
        return {k: list(v) for k, v in spec.items()}
    inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    name = next((n for n, m in model.named_modules() if m is inp), "embed_tokens") if inp is not None else "embed_tokens"
    return {name: list(spec)}


def _tied_head(model: nn.Module) -> tuple[str, nn.Module] | None:
    """(name, module) of the output head that shares the input embedding's weight (tie_word_embeddings), if any."""
    cfg = getattr(model, "config", None)
    if cfg is None or not getattr(cfg, "tie_word_embeddings", False) or not hasattr(model, "get_output_embeddings"):
        return None
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    inp = inp.token_adapter.base_layer if isinstance(inp, TokenWrapper) else inp
    if out is None or isinstance(out, TokenWrapper) or getattr(out, "weight", None) is not inp.weight:
        return None
    return next(((n, m) for n, m in model.named_modules() if m is out), None)


def wrap_trainable_tokens(model: nn.Module, config, name: str) -> None:
    """Wrap the embeddings config.trainable_token_indices names (PEFT's rule: a module whose name ends with
    the key) and add adapter `name`'s rows; a head tied to the input embedding gets a tied wrapper."""
    targets = _targets(model, config)
    clash = [t for t in targets if t in (config.modules_to_save or [])]
    if clash:
        raise LorakitError(f"The embedding layer is already marked to be trained fully, either specify "
                           f"`modules_to_save=[..., \"{clash[0]}\", ...]` or `trainable_tokens={{'{clash[0]}': x}}` "
                           "but not both.")
    head = _tied_head(model)
    if head is not None and head[0] in targets and any(targets[t] != targets[head[0]] for t in targets
                                                       if t != head[0]):
        head = None  # different rows asked for the tied head: each wrapped on its own (as PEFT)
    elif head is not None:
        targets.pop(head[0], None)
    problems = []
    for key, indices in targets.items():
        names = [n for n, m in model.named_modules(remove_duplicate=False)
                 if n.endswith(key) and not isinstance(m, TokenLayer) and ".token_adapter." not in f"{n}."]
        if not names:
            problems.append(f"trainable_token_indices names {key!r}, which matches no module of "
                            f"{type(model).__name__}; name the embedding layer (e.g. 'embed_tokens')")
        for n in names:
            _wrap_one(model, n, name, indices)
    LorakitError.collect(problems)
    if head is not None and isinstance(model.get_input_embeddings(), TokenWrapper):
        _wrap_one(model, head[0], name, None, tied=model.get_input_embeddings().token_adapter)


def _wrap_one(model: nn.Module, module_name: str, name: str, indices, tied: TokenLayer | None = None) -> None:
    parent_name, _, child = module_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    module = getattr(parent, child)
    if not isinstance(module, TokenWrapper):
        module = TokenWrapper(module, tied)
        setattr(parent, child, module)
    module.token_adapter.add(name, indices)


def set_active(model: nn.Module, names: list[str]) -> None:
    """At most one adapter with trainable tokens runs in a layer (PEFT's rule)."""
    for lname, layer in token_layers(model):
        here = [n for n in names if n in layer.token_indices]
        if len(here) > 1:
            raise LorakitError(f"Only one adapter can be set at a time for TrainableTokensWrapper {lname!r}, got "
                               f"{len(here)} ({here}); activate one of them")
        layer.active_adapters = here


def set_trainable(model: nn.Module, name: str, flag: bool) -> None:
    for _, layer in token_layers(model):
        if name in layer.trainable_tokens_delta:
            layer.trainable_tokens_delta[name].requires_grad_(flag)
