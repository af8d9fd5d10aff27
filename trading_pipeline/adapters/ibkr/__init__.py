"""IBKR Client Portal Web API: client, `ibkr` market data source, `ibkr` broker.

    from trading_pipeline.adapters.ibkr.client import IBKRClient
    from trading_pipeline.adapters.ibkr.market_data import IBKRMarketData
    from trading_pipeline.adapters.ibkr.broker import IBKRBroker

The gateway emulator is a test tool and lives with the tests
(`python -m trading_pipeline_tests.emulators.ibkr_gateway`, from the checkout).
"""

_LAZY = {
    "IBKRClient": "trading_pipeline.adapters.ibkr.client",
    "IBKRMarketData": "trading_pipeline.adapters.ibkr.market_data",
    "IBKRBroker": "trading_pipeline.adapters.ibkr.broker",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)
