"""PeftModel, LoraModel, get_peft_model: PEFT's model classes over adapters/ and combine/.

    from lorakit import LoraConfig, get_peft_model, PeftModel
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]))
    model.print_trainable_parameters(); model.save_pretrained("adapter")
    model = PeftModel.from_pretrained(base_model, "adapter")

PeftModel holds the transformers model at `base_model.model` like PEFT, so parameter names
(base_model.model.model.layers.0...) agree. Every method is a thin call into adapters/ or
combine/; unknown attributes fall through to the wrapped model (config, generate, device...).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from torch import nn

import collections

from ..adapters import files, manage, rows
from ..combine import add_weighted_adapter as _add_weighted_adapter
from ..config import LoraConfig, TaskType
from ..errors import LorakitError
from ..layers import monteclora
from . import card


CLASSIFIER_TASKS = ("SEQ_CLS", "TOKEN_CLS")
CLASSIFIER_HEADS = ("classifier", "score")  # PEFT adds these to modules_to_save for those tasks
# What PEFT's load_adapter returns: lorakit refuses a file that misses keys, so both lists are empty after success
LoadResult = collections.namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])


class LoraModel(nn.Module):
    """PEFT's middle layer: holds the transformers model as `.model`; PEFT's tuner methods."""

    prefix = "lora_"  # PEFT: the name part of every adapter parameter

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    @property
    def peft_config(self) -> dict[str, LoraConfig]:
        return manage.configs(self.model)

    @property
    def active_adapters(self) -> list[str]:
        return manage.active_adapters(self.model)

    @property
    def active_adapter(self) -> str | list[str]:
        active = self.active_adapters
        return active[0] if len(active) == 1 else active

    def _get_monteclora_loss(self, adapter_names: str | list[str] | None = None):
        """PEFT's MonteCLoRA regulariser (KL + entropy, the mean over the adapted layers) to add to the loss;
        0.0 when no adapter of `adapter_names` (default: the active ones) is MonteCLoRA, and in eval mode."""
        names = self.active_adapters if adapter_names is None else adapter_names
        return monteclora.variational_loss(self.model, [names] if isinstance(names, str) else list(names))

    @property
    def targeted_module_names(self) -> list[str]:
        """The modules that hold LoRA layers, in model order."""
        return [name for name, _ in manage.lora_layers(self.model)]

    @property
    def has_active_enabled_adapter(self) -> bool:
        """True when some LoRA layer runs an adapter (adapters not disabled)."""
        return any(layer.active_adapters and not layer.disabled for _, layer in manage.lora_layers(self.model))

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        manage.set_adapter(self.model, adapter_name)

    def disable_adapter_layers(self) -> None:
        manage.set_disabled(self.model, True)

    def enable_adapter_layers(self) -> None:
        manage.set_disabled(self.model, False)

    def delete_adapter(self, adapter_name: str) -> None:
        manage.delete_adapter(self.model, adapter_name)

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        manage.merge(self.model, adapter_names, safe_merge)

    def unmerge_adapter(self) -> None:
        manage.unmerge(self.model)

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: list[str] | None = None) -> nn.Module:
        return manage.merge_and_unload(self.model, safe_merge, adapter_names)

    def unload(self) -> nn.Module:
        return manage.unload(self.model)

    def _get_kasa_loss(self, adapter_names: str | list[str] | None = None):
        return manage.kasa_loss(self.model, adapter_names)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("model"), name)


class PeftModel(nn.Module):
    """A transformers model with named LoRA adapters, PEFT's API."""

    def __init__(self, model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True, low_cpu_mem_usage: bool = False):
        super().__init__()
        self.base_model = LoraModel(model)
        manage.add_adapter(model, peft_config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                           low_cpu_mem_usage=low_cpu_mem_usage)

    # -- state -----------------------------------------------------------------------------------------
    @property
    def peft_config(self) -> dict[str, LoraConfig]:
        return manage.configs(self.get_base_model())

    @property
    def active_adapters(self) -> list[str]:
        return manage.active_adapters(self.get_base_model())

    @property
    def active_adapter(self) -> str:
        active = self.active_adapters
        return active[0] if len(active) == 1 else active

    @property
    def active_peft_config(self) -> LoraConfig:
        return self.peft_config[self.active_adapters[0]]

    @property
    def modules_to_save(self) -> set[str] | None:
        """The union of the adapters' modules_to_save (PEFT's attribute), None when there are none."""
        names = {m for c in self.peft_config.values() for m in c.modules_to_save or []}
        return names or None

    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    # -- running ---------------------------------------------------------------------------------------
    def forward(self, *args, adapter_names: list[str] | None = None, **kwargs):
        with self._rows(adapter_names):
            return self.get_base_model()(*args, **kwargs)

    def generate(self, *args, adapter_names: list[str] | None = None, **kwargs):
        with self._rows(adapter_names):
            return self.get_base_model().generate(*args, **kwargs)

    def _rows(self, adapter_names):
        if adapter_names is None:
            return contextlib.nullcontext()
        return rows.adapter_rows(self.get_base_model(), adapter_names)

    @contextlib.contextmanager
    def disable_adapter(self):
        with manage.disable_adapters(self.get_base_model()):
            yield

    # -- adapters --------------------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, peft_config: LoraConfig, low_cpu_mem_usage: bool = False,
                    autocast_adapter_dtype: bool = True) -> None:
        """Add a new adapter; as in PEFT it is not activated (call set_adapter). low_cpu_mem_usage: its
        tensors are created empty on the meta device, to be filled by set_peft_model_state_dict."""
        manage.add_adapter(self.get_base_model(), peft_config, adapter_name, activate=False,
                           autocast_adapter_dtype=autocast_adapter_dtype, low_cpu_mem_usage=low_cpu_mem_usage)

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        manage.set_adapter(self.get_base_model(), adapter_name)

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        for name in [adapter_names] if isinstance(adapter_names, str) else adapter_names:
            manage.set_trainable(self.get_base_model(), name, requires_grad)

    def delete_adapter(self, adapter_name: str) -> None:
        manage.delete_adapter(self.get_base_model(), adapter_name)

    def load_adapter(self, model_id: str, adapter_name: str, is_trainable: bool = False, **kwargs) -> LoadResult:
        """Add adapter `adapter_name` from a folder; like PEFT, not activated, eval mode unless trainable.
        Returns PEFT's (missing_keys, unexpected_keys): a file that does not fit raises instead."""
        files.load_adapter(self.get_base_model(), _local_dir(model_id, kwargs), adapter_name,
                           is_trainable=is_trainable, activate=False,
                           autocast_adapter_dtype=kwargs.get("autocast_adapter_dtype", True))
        if not is_trainable:
            self.eval()
        return LoadResult([], [])

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "svd", svd_rank: int | None = None, **kw):
        """PEFT's signature; the math and its differences are in combine.add_weighted_adapter."""
        return _add_weighted_adapter(self.get_base_model(), adapters, weights, adapter_name, combination_type,
                                     svd_rank, **kw)

    # -- merging ---------------------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        manage.merge(self.get_base_model(), adapter_names, safe_merge)

    def unmerge_adapter(self) -> None:
        manage.unmerge(self.get_base_model())

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: list[str] | None = None) -> nn.Module:
        return manage.merge_and_unload(self.get_base_model(), safe_merge, adapter_names)

    def unload(self) -> nn.Module:
        return manage.unload(self.get_base_model())

    # -- reporting -------------------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        return manage.count_parameters(self)

    def print_trainable_parameters(self) -> None:
        print(manage.trainable_report(self))

    # -- files -----------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | Path, safe_serialization: bool = True,
                        selected_adapters: list[str] | None = None, save_embedding_layers: bool | str = "auto",
                        **kwargs) -> None:
        """Like PEFT: 'default' goes to save_directory, any other adapter to save_directory/<name>, plus
        the model card README.md. safe_serialization=False writes adapter_model.bin (torch.save), as PEFT;
        lorakit reads such files only with torch.load(weights_only=True) (docs/peft-compat.md)."""
        model = self.get_base_model()
        if not self.peft_config:
            raise LorakitError("this model has no adapter to save: merge_and_unload() / unload() removed them (the "
                               "weights are in the base now); save the merged model with its own save_pretrained: "
                               "merged = model.merge_and_unload(); merged.save_pretrained(dir)")
        unknown = [n for n in selected_adapters or [] if n not in self.peft_config]
        if unknown:
            raise LorakitError(f"selected_adapters {unknown} are not adapters of this model; it has "
                               f"{sorted(self.peft_config)}")
        for name in selected_adapters or list(self.peft_config):
            directory = Path(save_directory) if name == "default" else Path(save_directory) / name
            cfg = self.peft_config[name]
            if cfg.task_type is None and cfg.auto_mapping is None:
                self.peft_config[name] = cfg.replace(auto_mapping={
                    "base_model_class": type(model).__name__, "parent_library": type(model).__module__})
            files.save_adapter(model, directory, name, save_embedding_layers, safe_serialization=safe_serialization)
            card.write_model_card(directory, model, self.peft_config[name])

    def push_to_hub(self, repo_id: str, **kwargs) -> None:
        """Save every adapter into a temporary folder and upload it to the Hub repo `repo_id`."""
        import tempfile

        from huggingface_hub import upload_folder
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)
            upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=kwargs.get("commit_message"),
                          token=kwargs.get("token"), revision=kwargs.get("revision"))

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | Path, adapter_name: str = "default",
                        is_trainable: bool = False, config: LoraConfig | None = None, **kwargs) -> "PeftModel":
        """Load an adapter folder (lorakit's or PEFT's) onto `model`; as PEFT, eval mode unless trainable.
        With `config` given, the folder's weights load under that config object (it must fit them)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.base_model = LoraModel(model)
        files.load_adapter(model, _local_dir(model_id, kwargs), adapter_name, is_trainable=is_trainable,
                           config=config, autocast_adapter_dtype=kwargs.get("autocast_adapter_dtype", True))
        if config is not None:
            config.inference_mode = not is_trainable
            manage.configs(model)[adapter_name] = config
        if not is_trainable:
            self.eval()
        return self

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(super().__getattr__("base_model"), name)


__all__ = ["LoadResult", "LoraModel", "PeftModel", "TaskType", "get_peft_model"]

# PEFT's task-specific classes behave the same here.
PeftModelForCausalLM = PeftModelForSequenceClassification = PeftModelForTokenClassification = PeftModel
PeftModelForSeq2SeqLM = PeftModelForQuestionAnswering = PeftModelForFeatureExtraction = PeftModel


def get_peft_model(model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default", mixed: bool = False,
                   autocast_adapter_dtype: bool = True, revision: str | None = None,
                   low_cpu_mem_usage: bool = False, **kwargs) -> PeftModel:
    """Wrap `model` with a new LoRA adapter (PEFT's entry point)."""
    if mixed:
        raise LorakitError("mixed=True (PeftMixedModel) is not supported; lorakit adapters are all LoRA")
    if peft_config.task_type in CLASSIFIER_TASKS:  # PEFT trains the task head too
        extra = [h for h in CLASSIFIER_HEADS if h not in (peft_config.modules_to_save or [])]
        peft_config = peft_config.replace(modules_to_save=list(peft_config.modules_to_save or []) + extra)
    return PeftModel(model, peft_config, adapter_name, autocast_adapter_dtype)


def _local_dir(model_id: str | Path, kwargs: dict) -> Path:
    """A local adapter folder, or a Hub id downloaded (only the adapter files) when online."""
    path = Path(model_id)
    if kwargs.get("subfolder"):
        path = path / kwargs["subfolder"]
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download
        # *adapter_model.bin: older PEFT adapters have only that (read with weights_only=True, adapters/binfile.py)
        local = snapshot_download(str(model_id), allow_patterns=["adapter_config.json", "*.safetensors",
                                                                 "*adapter_model.bin"],
                                  revision=kwargs.get("revision"))
        return Path(local) / kwargs.get("subfolder", "")
    except Exception as e:
        raise LorakitError(f"adapter {str(model_id)!r} is not a local folder and could not be fetched from the "
                           f"Hub ({type(e).__name__}); pass the path of a folder with adapter_config.json") from None
