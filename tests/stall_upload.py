"""``main.py`` whose upload of one checkpoint object never finishes, so that a test can kill a run
while a checkpoint is on its way to object storage.

    FLEXBERT_TEST_STALL_UPLOAD=ep0-ba6/__1_0.distcp FLEXBERT_TEST_STALL_MARKERS=DIR \\
        composer -n 2 tests/stall_upload.py RECIPE.yaml

The rank that is to upload an object whose name ends with the given text hands its upload worker a
task that creates ``DIR/rank{R}`` and holds still (it gives up after a few minutes, so a failed test
leaves no process behind): training goes on, as it does while an upload is in flight, and the run
then waits at its end for that upload, until killed. Every other upload goes through. At the end of
the step whose checkpoint stalls, before that checkpoint is saved, rank 0 first waits until the
pointer to the previous checkpoint is uploaded (Composer uploads it once every object of that
checkpoint is in the bucket, at the end of some later step): so the kill finds the pointer naming
the previous checkpoint, as it would after a kill long into the run.
"""

import os
import re
import sys
import time
from pathlib import Path

# Only the standard library at the top: Composer's upload workers are spawned processes, which import
# this script again (not as __main__) to find ``stall``.
GIVE_UP_SECONDS = 300


def stall(marker: str) -> int:
    """The upload that never finishes, run in the upload worker (a process of its own)."""
    Path(marker).touch()
    time.sleep(GIVE_UP_SECONDS)
    return 1


def main() -> int:
    from composer.callbacks import CheckpointSaver
    from composer.core import Callback
    from composer.utils import dist
    from composer.utils.remote_uploader import RemoteUploader

    import flexbert.train.pretrain
    from flexbert.cli import main as cli_main

    stalled = os.environ["FLEXBERT_TEST_STALL_UPLOAD"]
    markers = Path(os.environ["FLEXBERT_TEST_STALL_MARKERS"])
    upload_file_async = RemoteUploader.upload_file_async

    def upload_or_stall(self, remote_file_name: str, file_path, overwrite: bool):
        if not remote_file_name.endswith(stalled):
            return upload_file_async(self, remote_file_name, file_path, overwrite)
        markers.mkdir(parents=True, exist_ok=True)
        future = self.upload_executor.submit(stall, str(markers / f"rank{dist.get_global_rank()}"))
        self.futures.append(future)
        return future

    class PreviousPointerFirst(Callback):
        """On rank 0, at the end of step ``batch``: upload the pending pointer before going on."""

        def __init__(self, batch: int):
            self.batch = batch

        def batch_end(self, state, logger) -> None:
            if dist.get_global_rank() != 0 or state.timestamp.batch.value != self.batch:
                return
            saver = next(callback for callback in state.callbacks if isinstance(callback, CheckpointSaver))
            deadline = time.monotonic() + GIVE_UP_SECONDS
            while saver.symlink_upload_tasks:  # uploaded once every object of its checkpoint is there
                saver.batch_end(state, logger)
                time.sleep(0.2)
                if time.monotonic() > deadline:
                    os._exit(4)
            saver.remote_uploader.wait()

    build_trainer = flexbert.train.pretrain.build_trainer

    def build_trainer_that_stalls(config, resolved):
        trainer = build_trainer(config, resolved)
        trainer.state.callbacks.append(PreviousPointerFirst(int(re.search(r"-ba(\d+)", stalled)[1])))
        return trainer

    RemoteUploader.upload_file_async = upload_or_stall
    flexbert.train.pretrain.build_trainer = build_trainer_that_stalls
    return cli_main(["train", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
