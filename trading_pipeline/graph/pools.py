"""Concurrency pools (Dagster op-level limits shared by all runs of the instance).

    market_data  4  history requests (IBKR allows 5 in flight; ibind uses 4)
    llm          4  model calls of the analyses
    decisions    2  the decisions' consolidation calls: a pool of their own, so decisions at the
                    open never wait for a slot held by analysis steps
    broker_orders 1 order placement: one at a time, never two decisions racing at the broker

Run `python -m trading_pipeline.graph.pools` (the Makefile's demo and dev targets do) to set
them on the instance in DAGSTER_HOME; change them later in the UI (Deployment → Concurrency).
"""

from __future__ import annotations

POOL_LIMITS = {"market_data": 4, "llm": 4, "decisions": 2, "broker_orders": 1}


def configure_pools(instance) -> dict[str, int]:
    """Set the default limit of each pool that has none yet; a limit changed in the UI stays."""
    storage = instance.event_log_storage
    existing = storage.get_concurrency_keys()
    limits = {}
    for pool, limit in POOL_LIMITS.items():
        if pool not in existing:
            storage.set_concurrency_slots(pool, limit)
        limits[pool] = storage.get_concurrency_info(pool).slot_count
    return limits


if __name__ == "__main__":
    from dagster import DagsterInstance

    with DagsterInstance.get() as instance:
        for pool, limit in configure_pools(instance).items():
            print(f"pool {pool}: {limit}")
