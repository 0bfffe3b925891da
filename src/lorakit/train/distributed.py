"""Training on several processes with PyTorch's own engine: torchrun starts them, torch.distributed
connects them, DistributedDataParallel or FSDP2 (`fully_shard`) keeps their adapters in step.

    torchrun --nproc_per_node N -m lorakit train CONFIG          (one node; torchrun's multi-node flags too)

    start(t)          -> Ranks: the process group from torchrun's environment (gloo on CPU, NCCL on CUDA,
                         a timeout on every collective), or a single process when WORLD_SIZE is unset / 1
    Ranks.wrap(model) the engine the loss goes through: DDP over the adapter parameters only (the frozen
                      base is not registered for gradient sync), or fully_shard per decoder layer + root
    Ranks.loss_sum / sum / accumulating    what loop.accumulate asks of the ranks (loop.OneProcess is the
                      single-process face of the same three)
    Ranks.adapter_tensors / optimizer_state  full tensors for the files, gathered from FSDP2 shards:
                      only the adapter's (the base is never gathered); rank 0 alone writes
    Ranks.evaluate    every rank evaluates its share of the eval set; the sums are all-reduced

The arithmetic that makes N processes equal one: each rank's loss is its Σ token losses divided by the
GLOBAL count of labelled tokens (all-reduced before the backward), and the engine SUMS the gradients
(a sum comm hook on DDP; sum reduction, divide factor 1 on FSDP2). So the summed gradient is exactly
the single process's over the same global batch (the data order is the single process's with
batch_size × world, each rank taking its share of every global micro-batch: batching.share).
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from ..adapters import files
from ..data import batching
from ..errors import LorakitError
from ..eval.losses import token_loss_sum

MODES = ("ddp", "fsdp")


class LossModule(nn.Module):
    """batch -> (Σ token losses, labelled tokens) of the model: the one forward the engine wraps, so
    lorakit's loss path (label-only logits, fused cross-entropy) runs inside DDP's and FSDP2's hooks."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict):
        return token_loss_sum(self.model, batch)


@dataclass
class Ranks:
    """This process's place among the run's processes, and the engine that keeps them in step."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    mode: str = "single"  # single | ddp | fsdp
    owns_group: bool = False  # this run created the process group (and ends it)
    engine: nn.Module | None = field(default=None, repr=False)

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes files, logs, plots and progress bars."""
        return self.rank == 0

    @property
    def share(self) -> tuple[int, int]:
        return self.rank, self.world

    def describe(self) -> str:
        if self.world == 1:
            return "1 process"
        return f"{self.world} processes ({self.mode}, {dist.get_backend()}, rank {self.rank})"

    # -- what the loop asks ------------------------------------------------------------------------------
    def loss_sum(self, model: nn.Module, batch: dict):
        return self.engine(batch) if self.engine is not None else token_loss_sum(model, batch)

    def sum(self, *values: float) -> tuple[float, ...]:
        """The values summed over the ranks (float64: token counts stay exact)."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
        dist.all_reduce(t)
        return tuple(t.tolist())

    def accumulating(self):
        """Around a micro-batch that is not the step's last: DDP keeps its gradients local (no_sync);
        FSDP2 reduce-scatters every micro-batch (its gradients are sharded, so it sums into the shards)."""
        return self.engine.no_sync() if self.mode == "ddp" else contextlib.nullcontext()

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on one (a stop asked of one rank stops them all, together)."""
        return bool(self.sum(float(flag))[0]) if self.world > 1 else flag

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    # -- building ------------------------------------------------------------------------------------------
    def device(self, device: torch.device) -> torch.device:
        """The device this rank trains on: cuda:LOCAL_RANK under torchrun on CUDA."""
        if self.world > 1 and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    def wrap(self, model: nn.Module, param_dtype: torch.dtype | None = None) -> None:
        """Put the engine around `model` (its adapter added, checkpointing on): DDP or fully_shard."""
        if self.world == 1:
            return
        if self.mode == "ddp":
            self.engine = _ddp(model)
        else:
            self.engine = _fsdp(model, self.world, param_dtype)

    # -- files: full tensors for rank 0 to write ---------------------------------------------------------------
    def adapter_tensors(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """The adapter file's tensors (PEFT keys), full; FSDP2: each gathered from its shards (a collective:
        every rank calls it), the base's never (unless the adapter file itself holds base embeddings)."""
        if self.mode != "fsdp":
            return None  # DDP: every rank holds the full adapter; the model is read as it is
        tensors = files.adapter_state_dict(model, state=model.state_dict())  # DTensor shards, nothing gathered
        return {k: _full(v) for k, v in tensors.items()}

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict | None:
        """optimizer.state_dict() with full tensors: the single-process layout, whatever the world size."""
        if self.mode != "fsdp":
            return None
        sd = optimizer.state_dict()
        sd["state"] = {i: {k: _full(v) for k, v in s.items()} for i, s in sd["state"].items()}
        return sd

    def save_adapter(self, model: nn.Module, directory) -> None:
        """The adapter in PEFT format, written by rank 0 (all ranks call: FSDP2 gathers)."""
        tensors = self.adapter_tensors(model)
        if self.main:
            files.save_adapter(model, directory, tensors=tensors)
        self.barrier()

    # -- evaluation ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: nn.Module, dataset, batch_size: int, device) -> dict:
        """Token-weighted eval loss over the whole eval set: each rank its share of every global batch of
        batch_size × world examples (the same number of forwards on every rank: FSDP2 gathers in each)."""
        was_training = model.training
        model.eval()
        total, count = 0.0, 0
        for examples in batching.batch_examples(dataset, batch_size * self.world, seed=0, group_by_length=True):
            batch = batching.to_device(batching.collate(share_or_blank(examples, self.share), dataset.pad_id),
                                       device)
            loss_sum, n = self.loss_sum(model, batch)
            total, count = total + float(loss_sum), count + n
        model.train(was_training)
        total, count = self.sum(total, count)
        mean = total / max(count, 1)
        return {"loss": mean, "perplexity": math.exp(min(mean, 50)), "tokens": int(count)}

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def share_or_blank(examples: list[dict], share: tuple[int, int]) -> list[dict]:
    """This rank's share of a global micro-batch; a rank whose share is empty (a last batch smaller than
    the world) gets one example with no labels: it runs the same forward and backward as the others
    (every collective is met) and adds nothing to the loss or the gradient."""
    mine = batching.share(examples, *share)
    return mine or [batching.unlabelled(examples[0])]


def start(distributed: str, timeout_s: float, device: torch.device) -> Ranks:
    """The ranks of this run from torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT);
    a process group already set up by the caller is used as it is (and left open)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    if distributed not in MODES:
        raise LorakitError(f"train.distributed must be one of {MODES} (got {distributed!r})")
    if not dist.is_available():
        raise LorakitError("torch was built without torch.distributed; install a standard torch build")
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    owns = not dist.is_initialized()
    if owns:
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("cuda:nccl,cpu:gloo" if cuda else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
    return Ranks(dist.get_rank(), dist.get_world_size(), local, distributed, owns)


def _comm_device() -> torch.device:
    """Where small collectives run: the CPU (gloo; start() gives CUDA runs "cuda:nccl,cpu:gloo"), the
    current GPU when the caller's group is NCCL alone."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor
    return t.full_tensor().cpu() if isinstance(t, DTensor) else t


def _sum_hook(group, bucket):
    """DDP comm hook: the gradients SUMMED over ranks (DDP's default averages); the loop already divided
    each rank's loss by the global token count."""
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def _ddp(model: nn.Module) -> nn.Module:
    """DDP over the adapter: the reducer buckets only parameters that require grad, so the frozen base is
    never synchronised; init_sync=False skips broadcasting the base at start (every rank loaded the same
    weights and seeded the same adapter init: checked by broadcasting the adapter alone).
    find_unused_parameters=False: every adapter parameter gets exactly one gradient per backward, and
    with non-reentrant checkpointing (models/speed.py) no parameter is "marked ready twice"."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    device = next(p.device for p in model.parameters())
    for p in model.parameters():
        if p.requires_grad:
            dist.broadcast(p.data, src=0)
    engine = DDP(LossModule(model), device_ids=[device.index] if device.type == "cuda" else None,
                 find_unused_parameters=False, forward_sync_buffers=False, init_sync=False)
    engine.register_comm_hook(None, _sum_hook)
    return engine


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The repeated blocks (the largest nn.ModuleList): FSDP2's unit of sharding."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 1]
    if not lists:
        raise LorakitError(f"train.distributed=fsdp: found no repeated layers (nn.ModuleList) in "
                           f"{type(model).__name__} to shard; use train.distributed=ddp")
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


def _fsdp(model: nn.Module, world: int, param_dtype: torch.dtype | None) -> nn.Module:
    """fully_shard on each decoder layer, then on the root (embeddings, norm, head, with the loss): each
    rank keeps 1/world of the base and of the adapter; a layer's weights are gathered for its forward
    and backward and freed after (reshard_after_forward). Gradients are reduce-scattered as sums."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    device = next(p.device for p in model.parameters())
    mesh = init_device_mesh(device.type, (world,))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else None
    kwargs = {"mesh": mesh, **({"mp_policy": mp} if mp else {})}
    units = [fully_shard(layer, **kwargs) for layer in decoder_layers(model)]
    root = fully_shard(LossModule(model), reshard_after_forward=False, **kwargs)
    for unit in (*units, root):  # per unit: these setters do not recurse
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)
    return root
