"""Errors a user can cause. Each names the problem and the fix, so the message alone is enough."""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix: bad config, bad strategies file, bad input data."""

    def __init__(self, problem: str, fix: str):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}\nFix: {fix}")


class ConfigError(UserError):
    """An environment variable or mode name is wrong."""


class StrategiesFileError(UserError):
    """The strategies file is missing or invalid."""


class BarDataError(UserError):
    """Market bars are unusable (bad prices, bad timestamps, not enough history)."""


class ChartRenderError(UserError):
    """Charts cannot be rendered (no Chromium, crashed or hung renderer)."""


class OrderRejectedError(UserError):
    """The broker refused the order outright: nothing is working there for it. A broker adapter
    raises a subclass; the order desk records the rejection instead of leaving it unknown."""


class ExitOrderStateError(UserError):
    """A position cannot be closed safely: one of its stop-loss or take-profit orders could not be
    confirmed cancelled, and closing while it may still work could trade the symbol a second time."""
