"""The fault matrix (trading_pipeline_tests/fault_matrix.py): at every kill point of an entry and of an
exit, nothing is sent twice and the position keeps an order that closes it."""

import pytest

from trading_pipeline_tests.fault_matrix import POINTS, format_matrix, run_cell


@pytest.mark.parametrize("kind", ["entry", "exit"])
def test_fault_matrix(kind, tmp_path):
    cells = [run_cell(kind, point, tmp_path) for point in POINTS]
    print(format_matrix(cells))
    assert all(cell.killed for cell in cells), format_matrix(cells)
    assert all(cell.ok for cell in cells), format_matrix(cells)
