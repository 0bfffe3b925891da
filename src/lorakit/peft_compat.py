"""The PEFT-style face: code written for PEFT runs with only the import changed.

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

from .adapters import files, manage, rows
from .combine import add_weighted_adapter as _add_weighted_adapter
from .config import LoraConfig
from .errors import LorakitError


CLASSIFIER_TASKS = ("SEQ_CLS", "TOKEN_CLS")
CLASSIFIER_HEADS = ("classifier", "score")  # PEFT adds these to modules_to_save for those tasks


class LoraModel(nn.Module):
    """PEFT's middle layer: holds the transformers model as `.model`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("model"), name)


class PeftModel(nn.Module):
    """A transformers model with named LoRA adapters, PEFT's API."""

    def __init__(self, model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True):
        super().__init__()
        self.base_model = LoraModel(model)
        manage.add_adapter(model, peft_config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)

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
    def add_adapter(self, adapter_name: str, peft_config: LoraConfig, low_cpu_mem_usage: bool = False) -> None:
        """Add a new adapter; as in PEFT it is not activated (call set_adapter)."""
        manage.add_adapter(self.get_base_model(), peft_config, adapter_name, activate=False)

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        manage.set_adapter(self.get_base_model(), adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        manage.delete_adapter(self.get_base_model(), adapter_name)

    def load_adapter(self, model_id: str, adapter_name: str, is_trainable: bool = False, **kwargs):
        files.load_adapter(self.get_base_model(), _local_dir(model_id, kwargs), adapter_name,
                           is_trainable=is_trainable, activate=False)

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
    def save_pretrained(self, save_directory: str | Path, selected_adapters: list[str] | None = None,
                        save_embedding_layers: bool | str = "auto", **kwargs) -> None:
        """Like PEFT: 'default' goes to save_directory, any other adapter to save_directory/<name>."""
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
            files.save_adapter(model, directory, name, save_embedding_layers)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | Path, adapter_name: str = "default",
                        is_trainable: bool = False, config: LoraConfig | None = None, **kwargs) -> "PeftModel":
        """Load an adapter folder (lorakit's or PEFT's) onto `model`."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.base_model = LoraModel(model)
        files.load_adapter(model, _local_dir(model_id, kwargs), adapter_name, is_trainable=is_trainable)
        return self

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(super().__getattr__("base_model"), name)


TaskType = type("TaskType", (), {t: t for t in ("CAUSAL_LM", "SEQ_CLS", "SEQ_2_SEQ_LM", "TOKEN_CLS",
                                                 "QUESTION_ANS", "FEATURE_EXTRACTION")})

# PEFT's task-specific classes behave the same here.
PeftModelForCausalLM = PeftModelForSequenceClassification = PeftModelForTokenClassification = PeftModel
PeftModelForSeq2SeqLM = PeftModelForQuestionAnswering = PeftModelForFeatureExtraction = PeftModel


def get_peft_model(model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default",
                   autocast_adapter_dtype: bool = True, **kwargs) -> PeftModel:
    """Wrap `model` with a new LoRA adapter (PEFT's entry point)."""
    if kwargs.get("mixed"):
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
        local = snapshot_download(str(model_id), allow_patterns=["adapter_config.json", "*.safetensors"],
                                  revision=kwargs.get("revision"))
        return Path(local) / kwargs.get("subfolder", "")
    except Exception as e:
        raise LorakitError(f"adapter {str(model_id)!r} is not a local folder and could not be fetched from the "
                           f"Hub ({type(e).__name__}); pass the path of a folder with adapter_config.json") from None
