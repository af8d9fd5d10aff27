"""trading_pipeline: an observable IBKR trading pipeline built as a Dagster asset graph."""
