"""Training data: read and check records, render them through the chat template, mask, pack, batch.

A record is one training example in one of four formats, detected from its keys:
  messages           {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}
  prompt_completion  {"prompt": ..., "completion": ...}
  alpaca             {"instruction": ..., "input": ... (optional), "output": ...}
  text               {"text": ...}
Files: .jsonl, .json (an array), .csv, .parquet (needs pyarrow). All records of a file share one format.

    records.py   read a file and check every record (file:line errors); record -> conversation
    encode.py    one record -> token ids and labels (-100 where no loss), through the chat template
    dataset.py   prepare a whole dataset (encode, drop, pack, statistics); hold out an eval split
    batching.py  packing, collation (padded or flat), the batch order of an epoch
"""

from .batching import IGNORE_INDEX, batch_order, batches, block_causal_mask, collate, pack
from .dataset import DataStats, TokenizedDataset, prepare, split_eval
from .encode import encode
from .records import Records, as_messages, check_record, load_records, record_format

__all__ = [
    "load_records", "encode", "prepare", "split_eval", "Records", "TokenizedDataset",
    "DataStats", "pack", "collate", "batches", "batch_order", "block_causal_mask",
    "record_format", "IGNORE_INDEX", "as_messages", "check_record",
]
