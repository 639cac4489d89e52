"""Checkpoints in object storage (``s3://bucket/key``), read without Composer.

A recipe whose ``save_folder`` is ``s3://bucket/prefix`` leaves there what Composer uploads: whole
files (``prefix/ep0-ba6-rank0.pt``), folders of FSDP shards (``prefix/ep0-ba6/``), the pointer to the
latest complete checkpoint (``prefix/latest-rank0.pt.symlink``, a text object naming its target's
key), and the run's resolved recipe, which training uploads as ``prefix/config.json``. A URI names a
checkpoint as the local paths do: the file, the shard folder, or the pointer (``.../latest-rank0.pt``,
with or without ``.symlink``).

:func:`local_checkpoint` downloads one into a temporary folder laid out as a run folder
(``checkpoints/<name>``, and ``config.json`` beside it when the bucket holds one), so that everything
reading local checkpoints, and finding their model in the run folder's config, reads it unchanged.

Only ``s3://`` is read here, with boto3 when it is installed (the training extra brings it): credentials
as boto3 finds them, ``S3_ENDPOINT_URL`` for an S3-compatible endpoint other than AWS (as Composer
and streaming read it). The copy goes to the temporary folder (``TMPDIR``) and is removed afterwards.
"""

from __future__ import annotations

import os
import re
import tempfile
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flexbert.errors import CheckpointError, MissingFileError

SYMLINK_SUFFIX = ".symlink"  # Composer's stand-in for a symbolic link in object storage
RUN_CONFIG_OBJECT = "config.json"  # the run's resolved recipe, beside its checkpoints
DCP_METADATA = ".metadata"  # the file that makes a folder a DCP checkpoint (of FSDP shards)


def is_remote(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a URI (``s3://...``) rather than a local path."""
    return "://" in str(path)


@dataclass(frozen=True)
class RemoteCheckpoint:
    """Where a checkpoint URI leads, once its pointer (if any) is followed."""

    uri: str  # as given
    bucket: str
    key: str  # the file, or the folder of shards (no trailing slash)
    objects: tuple[str, ...]  # the file, or every object of the folder
    config_key: str | None  # the run's config.json beside the checkpoint, when there is one

    @property
    def sharded(self) -> bool:
        return self.objects != (self.key,)

    @property
    def resolved_uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


def _bucket_and_key(uri: str) -> tuple[str, str]:
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme != "s3":
        raise CheckpointError(
            f"{uri}: only s3:// checkpoints are read from object storage here (S3_ENDPOINT_URL selects another "
            "S3-compatible endpoint); copy it to a local path first"
        )
    key = parsed.path.strip("/")
    if not parsed.netloc or not key:
        raise CheckpointError(f"{uri}: expected s3://BUCKET/KEY, naming a checkpoint")
    return parsed.netloc, key


def _client() -> Any:
    try:
        import boto3  # only remote checkpoints need it; the training extra brings it
    except ImportError:
        raise CheckpointError(
            "reading checkpoints from object storage needs boto3 (pip install boto3, or the training extra); "
            "or copy the checkpoint to a local path first"
        ) from None
    return boto3.session.Session().client("s3", endpoint_url=os.environ.get("S3_ENDPOINT_URL") or None)


def _storage_errors() -> tuple[type[Exception], ...]:
    from botocore.exceptions import BotoCoreError, ClientError

    return BotoCoreError, ClientError


def _exists(client: Any, bucket: str, key: str) -> bool:
    from botocore.exceptions import ClientError

    try:
        client.head_object(Bucket=bucket, Key=key)
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return False
        raise
    return True


def _keys_under(client: Any, bucket: str, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def _read_pointer(client: Any, bucket: str, key: str) -> str:
    return client.get_object(Bucket=bucket, Key=key)["Body"].read().decode().strip().strip("/")


def _find(client: Any, uri: str, bucket: str, key: str, follow: bool = True) -> RemoteCheckpoint:
    if _exists(client, bucket, key):
        if key.endswith(SYMLINK_SUFFIX) and follow:
            return _find(client, uri, bucket, _read_pointer(client, bucket, key), follow=False)
        objects = (key,)
    else:
        under = _keys_under(client, bucket, key + "/")
        if f"{key}/{DCP_METADATA}" in under:
            objects = tuple(under)
        elif follow and _exists(client, bucket, key + SYMLINK_SUFFIX):
            return _find(client, uri, bucket, _read_pointer(client, bucket, key + SYMLINK_SUFFIX), follow=False)
        else:
            raise MissingFileError(f"checkpoint not found: {uri}")
    folder = key.rpartition("/")[0]
    config_key = f"{folder}/{RUN_CONFIG_OBJECT}" if folder else RUN_CONFIG_OBJECT
    return RemoteCheckpoint(uri, bucket, key, objects, config_key if _exists(client, bucket, config_key) else None)


def find_remote_checkpoint(uri: str) -> RemoteCheckpoint:
    """Where ``uri`` leads (no download): a file, a folder of shards, or a pointer's target. A missing
    checkpoint, bucket or credential is one line naming the URI."""
    bucket, key = _bucket_and_key(uri)
    client = _client()
    try:
        return _find(client, uri, bucket, key)
    except _storage_errors() as err:
        raise CheckpointError(f"cannot read {uri}: {err}") from None


def saved_remote_checkpoints(folder: str, saved_name: re.Pattern[str]) -> dict[int, str]:
    """The URI of every checkpoint training saved into the remote ``folder`` (a run's ``save_folder``),
    by the batch it was saved at: whole files and shard folders alike, named as ``saved_name`` (the
    checkpoint format's pattern, whose second group is the batch) matches them, up to the one the
    pointer names (a newer one is an upload cut short, possibly partial)."""

    parsed = urllib.parse.urlparse(folder)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise CheckpointError(f"{folder}: only s3://BUCKET/PREFIX folders are read from object storage here")
    bucket, prefix = parsed.netloc, parsed.path.strip("/")
    start = f"{prefix}/" if prefix else ""
    client = _client()
    try:
        found: dict[int, str] = {}
        for key in _keys_under(client, bucket, start):
            name = key.removeprefix(start).split("/")[0]
            if match := saved_name.fullmatch(name):
                found[int(match[2])] = f"s3://{bucket}/{start}{name}"
        latest = f"{start}latest-rank0.pt{SYMLINK_SUFFIX}"
        last = None
        if found and _exists(client, bucket, latest):
            last = saved_name.fullmatch(_read_pointer(client, bucket, latest).rpartition("/")[2])
    except _storage_errors() as err:
        raise CheckpointError(f"cannot read {folder}: {err}") from None
    return {step: uri for step, uri in sorted(found.items()) if last is not None and step <= int(last[2])}


@contextmanager
def local_checkpoint(path: str | os.PathLike) -> Iterator[Path]:
    """``path`` itself when it is local; a remote checkpoint downloaded into a temporary run folder
    (``checkpoints/<name>``, with the run's ``config.json`` beside it when the bucket holds one),
    removed when the block ends."""
    if not is_remote(path):
        yield Path(path)
        return
    found = find_remote_checkpoint(str(path))
    client = _client()
    with tempfile.TemporaryDirectory(prefix="flexbert-checkpoint-") as folder:
        run = Path(folder)
        local = run / "checkpoints" / found.key.rpartition("/")[2]
        try:
            for key in found.objects:
                destination = local / key.removeprefix(found.key + "/") if found.sharded else local
                destination.parent.mkdir(parents=True, exist_ok=True)
                client.download_file(found.bucket, key, str(destination))
            if found.config_key is not None:
                client.download_file(found.bucket, found.config_key, str(run / RUN_CONFIG_OBJECT))
        except _storage_errors() as err:
            raise CheckpointError(f"cannot download {found.resolved_uri}: {err}") from None
        except OSError as err:  # a full disk
            raise CheckpointError(f"cannot download {found.resolved_uri} into {folder}: {err}") from None
        yield local
