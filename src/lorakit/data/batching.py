"""Turn encoded examples into model batches: packing, padding, and the batch order.

An example is {"input_ids": [int], "labels": [int]} (labels -100 where no loss).
A packed row also has "position_ids", restarting at 0 for each example in it.

Packed rows and attention (measured with transformers 5.23, torch 2.13 CPU; and 5.17,
torch 2.11 on an H100). transformers' masking_utils detects packing from restarting
position_ids and builds a block-diagonal mask itself, but only when attention_mask is
None AND no KV cache exists. Llama's config has use_cache=True, so a plain
`model(input_ids, position_ids=...)` (train mode included) builds a cache and silently
lets attention cross examples; a 2D attention_mask does the same. collate therefore
gives packed rows an explicit 4D additive mask, (B, 1, T, T), which eager and sdpa
honour whatever use_cache is. Its dtype must be the model's: on CUDA, sdpa with a
bf16/fp16 model and a float32 mask gives NaN or wrong logits; a bool mask is right for
sdpa but eager adds it as 0/1. So pass mask_dtype=model.dtype.

The trainer's default is neither: collate(flat=True) lays a batch's examples (or packed rows)
end to end in one unpadded row with their bounds as cu_seq_lens (models/attention.py), so no padding
and no (T, T) mask is computed.

Public: pack, collate, batches, batch_examples, batch_order, block_causal_mask, to_device, share,
unlabelled, IGNORE_INDEX.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Iterator, Sequence

import torch

from ..errors import LorakitError

IGNORE_INDEX = -100  # label of a token that carries no loss (torch cross_entropy's default)
_MEGABATCH = 50  # length grouping sorts within windows of 50 batches, so order stays random


def pack(examples: Sequence[dict], max_length: int) -> list[dict]:
    """Put examples into as few rows of <= max_length tokens as fit (best-fit decreasing).

    Each row: input_ids and labels concatenated, position_ids restarting at 0 for every
    example, and the label of each example's first token set to -100: with packing the
    token before it belongs to another example, which must not be trained to predict it.
    """
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    members: list[list[int]] = []  # example indices of each row
    room: list[tuple[int, int]] = []  # (free tokens, row) of rows with space, sorted
    for i in order:
        n = len(examples[i]["input_ids"])
        if not 0 < n <= max_length:
            raise LorakitError(f"example {i} has {n} tokens; packing needs 1..{max_length} "
                               f"(encode truncates to max_length)")
        k = bisect.bisect_left(room, (n, -1))  # the fullest row that still fits it
        if k < len(room):
            free, row = room.pop(k)
        else:
            free, row = max_length, len(members)
            members.append([])
        members[row].append(i)
        if free - n > 0:
            bisect.insort(room, (free - n, row))
    return [_join([examples[i] for i in row]) for row in members]


def _join(parts: list[dict]) -> dict:
    input_ids, labels, position_ids = [], [], []
    for part in parts:
        input_ids += part["input_ids"]
        labels += [IGNORE_INDEX] + list(part["labels"][1:])
        position_ids += range(len(part["input_ids"]))
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def block_causal_mask(position_ids: torch.Tensor,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, T) position ids -> (B, 1, T, T) additive attention mask for packed rows.

    A new example starts wherever the position does not follow the previous one by 1
    (the rule transformers uses). Query q may see key k when both are in the same
    example and k <= q: 0 there, dtype's most negative finite value elsewhere (what
    transformers' own eager masks use). dtype must be the model's. Memory: B*T*T elements.
    """
    step = torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1)  # (B, T)
    example = (step != 1).cumsum(-1)  # (B, T) example index of each token
    same = example[:, :, None] == example[:, None, :]  # (B, T, T)
    T = position_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=position_ids.device).tril()
    mask = torch.zeros(same.shape, dtype=dtype, device=position_ids.device)
    mask.masked_fill_(~(same & causal), torch.finfo(dtype).min)
    return mask[:, None]  # (B, 1, T, T)


def collate(examples: Sequence[dict], pad_id: int,
            mask_dtype: torch.dtype = torch.float32, flat: bool = False) -> dict:
    """Pad examples on the right to the longest one; returns a dict of tensors.

    input_ids (B, T) (pads = pad_id), labels (B, T) (pads = -100) and attention_mask:
    (B, T) 1/0 for plain examples; for packed rows position_ids (B, T) and the
    (B, 1, T, T) block_causal_mask in mask_dtype (give the model's dtype), the pad tail
    forming an example of its own after the real ones. `model(**batch)` is then right.
    flat=True: no padding at all, see `_flat`; when the examples are plain and of one length there is
    none to drop, and the (B, T) batch is kept (one batched attention call: 3% faster than a loop over
    equal examples, measured at 4x128 on CPU).
    """
    if not examples:
        raise LorakitError("collate got no examples: batch_size must be >= 1")
    packed = {"position_ids" in e for e in examples}
    if len(packed) > 1:
        raise LorakitError("collate got packed and unpacked examples in one batch")
    if flat and (packed == {True} or len({len(e["input_ids"]) for e in examples}) > 1):
        return _flat(examples)
    B, T = len(examples), max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    for b, example in enumerate(examples):
        n = len(example["input_ids"])
        input_ids[b, :n] = torch.tensor(example["input_ids"])
        labels[b, :n] = torch.tensor(example["labels"])
        attention_mask[b, :n] = 1
        if packed == {True}:
            position_ids[b, :n] = torch.tensor(example["position_ids"])
            position_ids[b, n:] = torch.arange(T - n)  # restarts at 0: a separate "example"
    if packed == {True}:
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
                "attention_mask": block_causal_mask(position_ids, mask_dtype)}
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def _flat(examples: Sequence[dict]) -> dict:
    """Every example (or packed row) end to end in one row: input_ids, labels, position_ids (1, N)
    with no padding, each example's first label -100 as in `pack`, and the examples' bounds as
    transformers' flash-attention kwargs: cu_seq_lens_q/k int32 (k+1,) and max_length_q/k. Exact
    with attention.flat_attention (per-example sdpa), flash_attention_2, or plain sdpa/eager (which
    build the block mask from position_ids); see models/attention.py."""
    rows = [e if "position_ids" in e else _join([e]) for e in examples]  # packed rows stay as they are
    row = {k: [v for r in rows for v in r[k]] for k in ("input_ids", "labels", "position_ids")}
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
    cu = torch.tensor(starts, dtype=torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    return {**{k: torch.tensor([v]) for k, v in row.items()}, "cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
            "max_length_q": longest, "max_length_k": longest}


def to_device(batch: dict, device) -> dict:
    """The batch with its tensors on `device` (a flat batch also carries ints: max_length_q/k)."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def batch_order(lengths: Sequence[int], batch_size: int, seed: int, epoch: int = 0,
                group_by_length: bool = True) -> list[list[int]]:
    """Example indices of every batch of one epoch; the same for the same arguments.

    Shuffled by (seed, epoch). With group_by_length, each window of 50 batches is sorted
    by length before being cut, so a batch holds similar lengths (little padding); the
    batches are then shuffled, and the one holding the longest example goes first, so an
    out-of-memory shows at step 0 rather than hours in.
    """
    if batch_size < 1:
        raise LorakitError(f"batch_size must be >= 1, got {batch_size}")
    rng = random.Random(f"lorakit:{seed}:{epoch}")  # str seeds hash the same in every run
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if not group_by_length:
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    window = batch_size * _MEGABATCH
    result = []
    for w in range(0, len(order), window):
        group = sorted(order[w:w + window], key=lambda i: -lengths[i])
        result += [group[i:i + batch_size] for i in range(0, len(group), batch_size)]
    rng.shuffle(result)
    if result:
        longest = max(range(len(result)), key=lambda b: max(lengths[i] for i in result[b]))
        result.insert(0, result.pop(longest))
    return result


def batches(dataset, batch_size: int, seed: int, epoch: int = 0, start: int = 0,
            group_by_length: bool = True, pad_id: int | None = None,
            mask_dtype: torch.dtype = torch.float32, flat: bool = False) -> Iterator[dict]:
    """Collated batches of one epoch, from batch number `start` on.

    To resume a run saved as (epoch, step within epoch), call with the same seed,
    epoch=epoch and start=step: the order is a pure function of (seed, epoch, lengths).
    dataset: a TokenizedDataset, or any sequence of examples when pad_id is given.
    mask_dtype: the model's dtype, for packed rows' attention masks (see collate).
    flat: one unpadded row per batch (see collate).
    """
    pad = getattr(dataset, "pad_id", None) if pad_id is None else pad_id
    if pad is None:
        raise LorakitError("batches needs pad_id for a dataset that does not carry one")
    for examples in batch_examples(dataset, batch_size, seed, epoch, start, group_by_length):
        yield collate(examples, pad, mask_dtype, flat)


def batch_examples(dataset, batch_size: int, seed: int, epoch: int = 0, start: int = 0,
                   group_by_length: bool = True) -> Iterator[list[dict]]:
    """The examples of each batch of one epoch, uncollated, from batch number `start` on, in the
    order of `batches` (for callers that need the examples too: the trainer counts their tokens)."""
    lengths = [len(example["input_ids"]) for example in dataset]
    for indices in batch_order(lengths, batch_size, seed, epoch, group_by_length)[start:]:
        yield [dataset[i] for i in indices]


def share(examples: Sequence[dict], rank: int, world: int) -> list[dict]:
    """Rank `rank`'s part of a global batch split over `world` processes: contiguous, sizes differing by
    at most one (a full batch of batch_size × world gives each rank batch_size examples, in order)."""
    base, extra = divmod(len(examples), world)
    start = rank * base + min(rank, extra)
    return list(examples[start:start + base + (rank < extra)])


def unlabelled(example: dict) -> dict:
    """The example with no label anywhere: a forward and backward that add nothing to loss or gradient."""
    return {**example, "labels": [IGNORE_INDEX] * len(example["labels"])}
