"""IO managers that store one value per asset partition, also for a run covering many partitions.

A batched run (one run per phase over every symbol, see graph/automation.py) hands the IO manager
one output covering many partitions: a dict {partition key: value}. Dagster's own pickle IO
managers refuse such an output; these store each value where a single-partition run would have
put it (`<base>/<asset>/<symbol>/<timeframe>`), so single and batched runs read each other's
values, and loading several partitions gives a dict {partition key: value} as usual (logged in one
line, not one per partition: each log line is an event-log write).

- `BatchFilesystemIOManager`: the default, under DAGSTER_HOME/storage (like Dagster's fs one).
- `batch_s3_pickle_io_manager(...)`: in a bucket (TRADING_IO_MANAGER=s3), for runs on several machines.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import dagster as dg
from dagster._core.storage.fs_io_manager import PickledObjectFilesystemIOManager
from dagster._core.storage.upath_io_manager import UPathIOManager
from dagster._utils.cached_method import cached_method


def _store_partitions(manager: UPathIOManager, context: dg.OutputContext, obj: Any) -> bool:
    """Store a multi-partition output value by value; False when it is not one (the caller stores it)."""
    if not context.has_asset_partitions or len(context.asset_partition_keys) == 1:
        return False
    paths = manager._get_paths_for_partitions(context)  # the layout single runs use
    if not isinstance(obj, Mapping) or set(obj) != set(paths):
        got = sorted(map(str, obj)) if isinstance(obj, Mapping) else type(obj).__name__
        raise dg.DagsterInvariantViolationError(
            f"{context.asset_key.to_user_string()}: an output covering {len(paths)} partitions must be a dict "
            f"{{partition key: value}} with exactly those keys; got {str(got)[:200]}")
    for key, path in paths.items():
        manager.make_directory(path.parent)
        manager.dump_to_path(context=context, obj=obj[key], path=path)
    context.add_output_metadata({"partitions_stored": len(paths)})
    return True


def _load_partitions(manager: UPathIOManager, context: dg.InputContext) -> Any:
    """The input's partitions as {partition key: value} (the value itself for one partition), with
    one log line for all: Dagster's logs a line per partition, each an event-log write."""
    keys = context.asset_partition_keys
    if len(keys) == 1:
        return UPathIOManager.load_partitions(manager, context)
    paths = manager._get_paths_for_partitions(context)
    context.log.debug(f"Loading {len(keys)} partitions of {context.asset_key.to_user_string()} "
                      f"from {manager._get_path_without_extension(context)}")
    return {key: manager.load_from_path(context=context, path=paths[key]) for key in keys}


class _PerPartitionFilesystem(PickledObjectFilesystemIOManager):
    def handle_output(self, context: dg.OutputContext, obj: Any):
        if not _store_partitions(self, context, obj):
            super().handle_output(context, obj)

    def load_partitions(self, context: dg.InputContext) -> Any:
        return _load_partitions(self, context)


class BatchFilesystemIOManager(dg.FilesystemIOManager):
    """Pickles under base_dir (default DAGSTER_HOME/storage); one file per asset partition, also
    when one run materializes many partitions."""

    def create_io_manager(self, context) -> _PerPartitionFilesystem:
        base_dir = self.base_dir or context.instance.storage_directory()
        return _PerPartitionFilesystem(base_dir=base_dir)


@functools.cache
def _batch_s3_class() -> type:
    from dagster_aws.s3 import S3PickleIOManager
    from dagster_aws.s3.io_manager import PickledObjectS3IOManager

    class PerPartitionS3(PickledObjectS3IOManager):
        def handle_output(self, context: dg.OutputContext, obj: Any):
            if not _store_partitions(self, context, obj):
                super().handle_output(context, obj)

        def load_partitions(self, context: dg.InputContext) -> Any:
            return _load_partitions(self, context)

    class BatchS3PickleIOManager(S3PickleIOManager):
        """Pickles in an S3/MinIO bucket at <prefix>/<asset>/<symbol>/<timeframe>; one object per
        asset partition, also when one run materializes many partitions."""

        @cached_method
        def inner_io_manager(self) -> PerPartitionS3:
            return PerPartitionS3(s3_bucket=self.s3_bucket, s3_session=self.s3_resource.get_client(),
                                  s3_prefix=self.s3_prefix)

    return BatchS3PickleIOManager


def batch_s3_pickle_io_manager(*, s3_resource, s3_bucket: str, s3_prefix: str = "dagster"):
    """The S3 flavour (dagster-aws and boto3 are imported only when it is chosen)."""
    return _batch_s3_class()(s3_resource=s3_resource, s3_bucket=s3_bucket, s3_prefix=s3_prefix)
