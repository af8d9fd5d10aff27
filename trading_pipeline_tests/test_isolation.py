"""The suite's own isolation: what one test leaves behind never reaches the next one on the same
pytest worker (conftest.py's autouse fixtures). Both tests are in one file, so one worker runs them
in this order."""

import os

PROBE = "TRADING_TEST_ISOLATION_PROBE"


def test_a_variable_set_by_the_code_under_test():
    os.environ[PROBE] = "yes"  # as `demo.main` sets TRADING_ORDERS_ENABLED and TRADING_AS_OF


def test_is_gone_in_the_next_test():
    assert PROBE not in os.environ
