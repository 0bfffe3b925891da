"""Training: run configs, the recipe that builds a run from one, and the loop it runs.

    config.py   RunConfig: defaults, then a YAML file, then --set overrides (file:line errors)
    recipe.py   build everything from a RunConfig (model, adapter, data, optimizer) and train
    loop.py     the loop over built objects, with hooks; micro-batches, accumulation, clipping
    hooks.py    the logbook and progress bar, evaluation and early stopping, checkpoints
    optim.py    AdamW (fused), LoRA+ parameter groups, warmup + cosine / linear / constant
    state.py    resumable training checkpoints, written atomically
    logbook.py  metrics.jsonl and the loss plot
    distributed.py  torchrun: DDP over the adapter or FSDP2 over a frozen base, rank 0 writes
"""

from .config import RunConfig, load_run
from .loop import NonFiniteLoss
from .optim import lora_plus_optimizer, lora_plus_param_groups
from .recipe import Recipe, TrainResult, build, train

__all__ = ["NonFiniteLoss", "Recipe", "RunConfig", "TrainResult", "build", "load_run", "lora_plus_optimizer",
           "lora_plus_param_groups", "train"]
