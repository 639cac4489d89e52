"""One rank of the elastic loader test (see test_elastic_resume.py), under 1 or 2 processes: reads
``BATCHES`` batches (all, if negative), after loading ``STATE`` if one is given; writes the piece keys
of every batch and the loader's state when it stopped.

    python elastic_loader_worker.py LOADER_CONFIG.json OUT_DIR BATCHES [STATE.json]
"""

import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

from flexbert.core.tokenizer import load_tokenizer
from flexbert.data.loader import PackedMLMLoader
from flexbert.data.streams import LoaderConfig
from flexbert.typed_config import from_dict

config_path, out, batches = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
if "WORLD_SIZE" in os.environ:
    dist.init_process_group("gloo")
rank = dist.get_rank() if dist.is_initialized() else 0
config = from_dict(LoaderConfig, json.loads(config_path.read_text()), "train_loader")
loader = PackedMLMLoader(config, load_tokenizer(config.tokenizer))
if len(sys.argv) > 4:
    loader.load_state_dict(json.loads(Path(sys.argv[4]).read_text()))
keys = []
for batch in loader:
    keys.append(batch.piece_keys.tolist())
    if len(keys) == batches:
        break
state = loader.state_dict()
(out / f"rank{rank}_keys.json").write_text(json.dumps(keys))
(out / f"rank{rank}_state.json").write_text(json.dumps(state))
if dist.is_initialized():
    dist.barrier()  # no destroy_process_group: see ddp_loader_worker.py
