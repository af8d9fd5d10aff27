"""IBKR Client Portal Web API: client, `ibkr` market data source, `ibkr` broker, local emulator.

    from trading_pipeline.adapters.ibkr.client import IBKRClient
    from trading_pipeline.adapters.ibkr.market_data import IBKRMarketData
    from trading_pipeline.adapters.ibkr.broker import IBKRBroker

The emulator (`python -m trading_pipeline.adapters.ibkr.emulator`) is never imported by the
client path: it alone needs starlette/uvicorn.
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
