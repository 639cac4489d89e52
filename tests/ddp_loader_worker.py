"""One rank of the two-process loader test (see test_data_loader.py): full run, then interrupted
and resumed run, each saving the piece keys of every batch."""

import json
import sys
from pathlib import Path

import torch.distributed as dist

from flexbert.core.tokenizer import load_tokenizer
from flexbert.data.loader import PackedMLMLoader
from flexbert.data.streams import LoaderConfig
from flexbert.typed_config import from_dict

corpus, tokenizer_dir, out = (Path(arg) for arg in sys.argv[1:4])
dist.init_process_group("gloo")
rank = dist.get_rank()
config = from_dict(
    LoaderConfig,
    dict(
        tokenizer=str(tokenizer_dir),
        max_seq_len=256,
        rows_per_batch=2,
        sample_batch_size=4,
        epochs=1,
        streams={name: {"local": str(corpus / name)} for name in ("web", "code")},
    ),
    "train_loader",
)
tokenizer = load_tokenizer(tokenizer_dir)


def keys(batches):
    return [batch.piece_keys.tolist() for batch in batches]


full = keys(PackedMLMLoader(config, tokenizer))
(out / f"rank{rank}_full.json").write_text(json.dumps(full))

# Interrupted after 6 batches, as a checkpoint would: every rank has taken as many batches, but
# packing has made them consume different numbers of documents.
loader = PackedMLMLoader(config, tokenizer)
stream = iter(loader)
head = keys(next(stream) for _ in range(6))
state = loader.state_dict()
(out / f"rank{rank}_state.json").write_text(json.dumps(state))
del stream, loader
resumed = PackedMLMLoader(config, tokenizer)
resumed.load_state_dict(state)
(out / f"rank{rank}_resumed.json").write_text(json.dumps(head + keys(resumed)))
# Both ranks have written their files. No destroy_process_group: gloo's teardown can wait forever
# once the other rank has exited (seen in CI, a rank stuck there after its work was done).
dist.barrier()
