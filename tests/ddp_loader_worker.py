"""One rank of the two-process loader test (see test_data_loader.py): full run, then interrupted
and resumed run, each saving the piece keys of every batch."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from flexbert.data.loader import PackedMLMLoader
from flexbert.data.streams import LoaderConfig
from flexbert.data.tokenizer import load_tokenizer
from flexbert.typed_config import from_dict

corpus, tokenizer_dir, out = (Path(arg) for arg in sys.argv[1:4])
dist.init_process_group("gloo")
rank = dist.get_rank()
config = from_dict(LoaderConfig, dict(
    tokenizer=str(tokenizer_dir), max_seq_len=256, rows_per_batch=2, sample_batch_size=4, epochs=1,
    streams={name: {"local": str(corpus / name)} for name in ("web", "code")},
), "train_loader")
tokenizer = load_tokenizer(tokenizer_dir)


def keys(batches):
    return [batch.piece_keys for batch in batches]


full = keys(PackedMLMLoader(config, tokenizer))
torch.save(full, out / f"rank{rank}_full.pt")

# Ranks stop after different numbers of batches, so they have consumed different document counts.
loader = PackedMLMLoader(config, tokenizer)
stream = iter(loader)
head = keys(next(stream) for _ in range(5 + 3 * rank))
state = loader.state_dict()
del stream, loader
resumed = PackedMLMLoader(config, tokenizer)
resumed.load_state_dict(state)
torch.save(head + keys(resumed), out / f"rank{rank}_resumed.pt")
dist.barrier()
dist.destroy_process_group()
