"""The timeframe contexts made once per series (adapters/llm/series_context.py) are, at every
position, the ones `request.timeframe_context` assembles there: same fields, same bits, same key."""

from __future__ import annotations

import numpy as np

from trading_pipeline.adapters.llm import request, series_context
from trading_pipeline.backtest.engine import prepare
from trading_pipeline.core.chart_spec import SeriesArrays


def test_every_position_reads_the_context_assembled_there(simulated):
    _, (_, bars, _), _ = simulated
    for timeframe in ("1d", "1w"):
        series = prepare("AAPL", timeframe, bars["AAPL"][timeframe])
        arrays = SeriesArrays(series.columns)
        *_, made = series_context.context_values(arrays, timeframe)
        assert made.any() and not made.all()  # the warm-up rows are assembled per call
        for end in range(1, len(arrays) + 1):
            fields = dict(symbol="AAPL", timeframe=timeframe, last_bar_start=series.starts[end - 1])
            numbers, read = series_context.timeframe_context(arrays, end, **fields)
            assembled_numbers, assembled = request.timeframe_context(SeriesArrays(series.columns), end, **fields)
            assert numbers == assembled_numbers or end < 15  # NaN before the ATR has a value
            assert read.fields == assembled.fields
            assert read.numbers.tobytes() == assembled.numbers.tobytes()
            assert read.sha256() == assembled.sha256() and read.as_json() == assembled.as_json()


def test_bounds_rows_are_the_bounds_of_each_row(simulated):
    _, (_, bars, _), _ = simulated
    series = prepare("AAPL", "1d", bars["AAPL"]["1d"])
    names, rows, complete = request.context_rows(SeriesArrays(series.columns), "1d")
    for row, bounds in zip(rows[complete], series_context.bounds_rows(rows[complete]), strict=True):
        expected = request._bounds(request.NumericContext(*row[:6].tolist()))
        assert np.array_equal(np.array(expected), bounds)
