"""The jobs a Celery worker rebuilds to run a step: the code location's, from the environment
(TRADING_EXECUTOR=celery, the strategies file, ...), as the run's process built them."""


def analyze_timeframe():
    from trading_pipeline.definitions import build_definitions

    return build_definitions().resolve_job_def("analyze_timeframe")
