"""One run over many partitions: how an asset materializes every partition of a batched run.

The schedules and the market-open sensor request one run per phase covering many partitions
(Dagster's partition-range run tags), and manual backfills do the same (`BATCH_POLICY`). An
asset then sees several `context.partition_keys`; `materialize_partitions` calls the asset's
per-partition step for each and gives every partition its own materialization metadata and its
own check results, as a run per partition would.

One partition's failure stays that partition's: its error (a user error with its fix, or any
exception) is recorded in its metadata and checks, its value becomes a `PartitionFailure` that
the steps after it carry along (the analysis turns it into NO_TRADE with the reason), the other
partitions go on, and an alert names what failed. A failed blocking check does the same for its
partition (in a run of one partition it stops the run, as always). Only when every partition
failed unexpectedly does the step fail (and its retry policy applies: the source may be down).

A run of a single partition works exactly as before: the step's value is the partition's value,
a user error fails the step (never retried) and a failed blocking check stops the run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import dagster as dg

from trading_pipeline.errors import UserError
from trading_pipeline.graph.assets.common import fail

# Manual backfills and the UI's "materialize all" make one run per rectangle of partitions.
BATCH_POLICY = dg.BackfillPolicy.single_run()
RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"


@dataclass(frozen=True)
class PartitionFailure:
    """The value of a partition that could not be produced in a batched run, and why."""

    asset: str
    partition: str
    problem: str
    fix: str

    def describe(self) -> str:
        return f"{self.asset} {self.partition} failed: {self.problem}"


@dataclass
class PartitionOutcome:
    """What one partition's step produced: its value, its metadata and its check results."""

    value: Any
    metadata: dict = field(default_factory=dict)
    check_results: Sequence[dg.AssetCheckResult] = ()


def partition_keys(context) -> list[str]:
    """The partition keys this run materializes, as strings ("SPY|1d", "SPY"); one for a single run."""
    return [str(key) for key in context.partition_keys]


def partition_dimensions(context, key: str) -> dict[str, str]:
    """{"symbol": ..., "timeframe": ...} of a multi-partition key string."""
    return context.assets_def.partitions_def.get_partition_key_from_str(key).keys_by_dimension


def range_tags(first: str, last: str) -> dict[str, str]:
    """Run tags that make a run cover the partitions from `first` to `last` (a rectangle for
    symbol × timeframe keys: "SPY|1d" to "MSFT|1d" is every symbol in between, 1d only)."""
    return {RANGE_START_TAG: first, RANGE_END_TAG: last}


def contiguous_ranges(ordered: Sequence[str], wanted: Sequence[str]) -> list[tuple[str, str]]:
    """The fewest (first, last) ranges of `ordered` that cover exactly the keys in `wanted`."""
    wanted_set, ranges, start, previous = set(wanted), [], None, None
    for key in ordered:
        if key in wanted_set:
            start = key if start is None else start
            previous = key
        elif start is not None:
            ranges.append((start, previous))
            start = None
    if start is not None:
        ranges.append((start, previous))
    return ranges


def materialize_partitions(
    context: dg.AssetExecutionContext,
    step: Callable[[str, Any], PartitionOutcome],
    upstream: Any = None,
    on_upstream_failure: Callable[[str, PartitionFailure], PartitionOutcome] | None = None,
    in_key_order: bool = False,
) -> Iterator:
    """Yield what materializes the run's partitions of the asset; `step(key, upstream value)` makes
    one partition (`upstream` is the asset's one input: the value, or a dict for several keys).
    `in_key_order`: make the partitions in sorted key order (orders: a deterministic sending order)
    rather than the partitions definition's order."""
    keys = partition_keys(context)
    if len(keys) == 1:
        value = upstream[keys[0]] if isinstance(upstream, dict) and keys[0] in upstream else upstream
        if isinstance(value, PartitionFailure) and on_upstream_failure is None:
            raise dg.Failure(description=f"{value.describe()}\nFix: {value.fix}",
                             metadata={"problem": value.problem, "fix": value.fix}, allow_retries=False)
        try:
            outcome = (on_upstream_failure(keys[0], value) if isinstance(value, PartitionFailure)
                       else step(keys[0], value))
        except UserError as error:
            raise fail(error) from None
        yield dg.MaterializeResult(value=outcome.value, metadata=outcome.metadata,
                                   check_results=list(outcome.check_results))
        return
    yield from _materialize_batch(context, sorted(keys) if in_key_order else keys, step, upstream or {},
                                  on_upstream_failure)


def _materialize_batch(context, keys, step, upstream: dict, on_upstream_failure) -> Iterator:
    asset = context.asset_key.to_user_string()
    selected_checks = [key for key in context.selected_asset_check_keys if key.asset_key == context.asset_key]
    blocking = {spec.key for spec in context.assets_def.check_specs if spec.blocking}
    values, evaluations, failed, unexpected = {}, [], [], []
    for key in keys:
        value = upstream.get(key)
        try:
            if isinstance(value, PartitionFailure):
                outcome = (on_upstream_failure(key, value) if on_upstream_failure else
                           PartitionOutcome(value, {"status": "not made: an earlier step failed",
                                                    "problem": value.describe(), "fix": value.fix}))
            else:
                outcome = step(key, value)
        except Exception as error:  # one partition's failure must not stop the others
            problem, fix = _describe(error)
            if not isinstance(error, UserError | dg.Failure):
                context.log.exception(f"{asset} {key}: unexpected error")
                unexpected.append(error)
            failure = PartitionFailure(asset, key, problem, fix)
            failed.append(failure)
            outcome = PartitionOutcome(failure, {"status": "FAILED", "problem": problem, "fix": fix},
                                       [dg.AssetCheckResult(check_name=check.name, passed=False,
                                                            metadata={"problem": f"not evaluated: {problem}"})
                                        for check in selected_checks])
        else:
            stopped = [r for r in outcome.check_results if not r.passed and _is_blocking(r, context, blocking)]
            if stopped and not isinstance(outcome.value, PartitionFailure):
                problem = "blocking check(s) failed: " + ", ".join(r.check_name for r in stopped)
                failure = PartitionFailure(asset, key, problem, "see the failed checks' metadata for the numbers")
                failed.append(failure)
                outcome.metadata = {**outcome.metadata, "status": "BLOCKED", "problem": problem}
                outcome.value = failure
        values[key] = outcome.value
        _add_partition_metadata(context, key, outcome.metadata)
        evaluations.extend(_evaluation(context, result, key) for result in outcome.check_results)
    if unexpected and len(unexpected) == len(keys):
        raise unexpected[0]  # nothing worked: likely the source, not the data; the retry policy applies
    context.log.info(f"{asset}: {len(keys) - len(failed)} of {len(keys)} partitions made"
                     + (f"; failed: {', '.join(f.partition for f in failed)}" if failed else ""))
    if failed:
        _alert(context, asset, len(keys), failed)
    yield dg.Output(values)
    yield from evaluations
    layer = context.job_def.asset_layer
    for check_key in selected_checks:
        yield dg.Output(None, output_name=layer.get_op_output_name(check_key))


def _add_partition_metadata(context, key: str, metadata: dict) -> None:
    """`context.add_asset_metadata(metadata, partition_key=key)` for a key of this run. Dagster checks
    the key against a fresh list of the run's partitions on every call: quadratic in a batch (9 ms a
    call at 200 symbols here, 7 s per analysis run). The keys here come from the run itself, so the
    metadata goes straight where that call puts it, when that internal is there."""
    step = context.get_step_execution_context()
    accumulator = getattr(step, "_metadata_accumulator", None)
    if accumulator is None or not hasattr(accumulator, "with_additional_asset_metadata"):
        context.add_asset_metadata(metadata, partition_key=key)
        return
    step._metadata_accumulator = accumulator.with_additional_asset_metadata(
        asset_key=context.asset_key, partition_key=key, metadata=metadata)


def _is_blocking(result: dg.AssetCheckResult, context, blocking: set) -> bool:
    key = dg.AssetCheckKey(context.asset_key, result.check_name)
    return key in blocking and result.severity == dg.AssetCheckSeverity.ERROR


def _evaluation(context, result: dg.AssetCheckResult, key: str) -> dg.AssetCheckEvaluation:
    # Recorded for its partition. Blocking is applied per partition above: a failed check must
    # not fail the step, which would stop every other partition of the batch after it.
    return dg.AssetCheckEvaluation(asset_key=context.asset_key, check_name=result.check_name, passed=result.passed,
                                   metadata=result.metadata, severity=result.severity,
                                   description=result.description, blocking=False, partition=key)


def _describe(error: Exception) -> tuple[str, str]:
    if isinstance(error, UserError):
        return error.problem, error.fix
    if isinstance(error, dg.Failure):
        return error.description or type(error).__name__, "see the step's log"
    return (f"{type(error).__name__}: {error}".strip(),
            "see the step's log for the traceback; re-materialize the partition once the cause is fixed")


def _alert(context, asset: str, total: int, failed: list[PartitionFailure]) -> None:
    from trading_pipeline.adapters.alerts import send_alert

    lines = "\n".join(f"  {f.partition}: {f.problem}\n    what to do: {f.fix}" for f in failed[:20])
    more = f"\n  ... and {len(failed) - 20} more" if len(failed) > 20 else ""
    send_alert(f"run {context.run.run_id[:8]} of {context.run.job_name}: {asset} failed for {len(failed)} of "
               f"{total} partitions (the others went on):\n{lines}{more}", logger=context.log)


def partitioned_checks(specs: Sequence[dg.AssetCheckSpec], partitions_def) -> list[dg.AssetCheckSpec]:
    """The asset's check specs, evaluated per partition (so a batched run records one result per
    partition, and the UI shows each partition's checks)."""
    return [dg.AssetCheckSpec(spec.name, asset=spec.asset_key, description=spec.description, blocking=spec.blocking,
                              metadata=spec.metadata, partitions_def=partitions_def) for spec in specs]
