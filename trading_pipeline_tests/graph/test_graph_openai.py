"""The whole graph with TRADING_ANALYST=openai against a local OpenAI-compatible server: the chart
PNG reaches the model, the model's plan passes the same risk gates, and a broken answer ends as
NO_TRADE with no order."""

import dagster as dg
import pytest

from trading_pipeline.core.analysis import Action
from trading_pipeline.core.strategies import parse_strategies
from trading_pipeline.definitions import build_definitions
from trading_pipeline.graph.assets import AS_OF_TAG
from trading_pipeline.graph.resources import resources_from_env
from trading_pipeline_tests.adapters.openai.local_server import LocalOpenAIServer, Reply, completion, good, image_parts

AS_OF = "2026-09-01T21:30:00+00:00"
STRATEGIES = parse_strategies("""\
strategies:
  - name: llm_test
    symbols: [SPY]
    timeframes: {1d: {period: 2y}, 1w: {period: 6y}}
    orders: {enabled: true}
""")


@pytest.fixture
def server():
    local = LocalOpenAIServer().start()
    yield local
    local.stop()


@pytest.fixture
def openai_env(server, tmp_path, monkeypatch):
    environment = {"TRADING_DATA_DIR": str(tmp_path / "data"), "TRADING_ORDERS_ENABLED": "yes",
                   "TRADING_AS_OF": AS_OF,  # the paper deployment's clock: the decision is current when sent
                   "TRADING_ANALYST": "openai", "OPENAI_API_KEY": "sk-test-graph-SECRET",
                   "OPENAI_BASE_URL": server.base_url, "OPENAI_MODEL": "gpt-4.1-mini",
                   "TRADING_LLM_BACKOFF_SECONDS": "0.01", "TRADING_LLM_BACKOFF_MAX_SECONDS": "0.05"}
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    return environment


def run_spy(environment, tmp_path):
    defs = build_definitions(STRATEGIES, resources_from_env(environment))
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        analyses = {}
        for timeframe in ("1d", "1w"):
            result = defs.resolve_job_def("analyze_timeframe").execute_in_process(
                partition_key=dg.MultiPartitionKey({"symbol": "SPY", "timeframe": timeframe}),
                instance=instance, tags={AS_OF_TAG: AS_OF})
            assert result.success
            analyses[timeframe] = result.output_for_node("ai_analyses")
        result = defs.resolve_job_def("decide_and_order").execute_in_process(
            partition_key="SPY", instance=instance, tags={AS_OF_TAG: AS_OF})
        assert result.success
        event = instance.get_latest_materialization_event(dg.AssetKey("ai_analyses"))
        metadata = event.asset_materialization.metadata
        return analyses, result.output_for_node("trade_decisions"), result.output_for_node("orders"), metadata


def test_model_plan_goes_through_the_gates_and_is_ordered_once(server, openai_env, tmp_path):
    server.reset(default=good())
    analyses, decision, order, metadata = run_spy(openai_env, tmp_path)
    daily = analyses["1d"]
    assert daily.analyst.startswith("openai:gpt-4.1-mini") and daily.vision is True
    assert daily.prompt_version.startswith("timeframe_analysis@")
    timeframe_requests = [b for b in server.bodies() if image_parts(b)]
    assert len(timeframe_requests) == 2  # both charts went to the model as images
    assert decision.action == Action.BUY and decision.quantity > 0
    assert decision.r_multiple == pytest.approx(abs(decision.targets[0] - decision.entry) / abs(decision.entry - decision.stop), abs=1e-3)
    assert order.status == "submitted" and order.filled_quantity == 0  # working until later bars fill it
    assert metadata["llm_tokens"].value > 0 and "SECRET" not in str(metadata)


def test_malformed_model_answer_is_no_trade_and_no_order(server, openai_env, tmp_path):
    server.reset(default=lambda body: Reply(200, completion("I think you should BUY it!!! {not json")))
    analyses, decision, order, _ = run_spy(openai_env, tmp_path)
    assert not analyses["1d"].valid and analyses["1d"].signal == Action.NO_TRADE
    assert decision.action == Action.NO_TRADE and decision.quantity == 0
    assert order.status == "not_sent"


BATCH = ["SPY", "AAPL", "MSFT", "NVDA", "AMZN", "QQQ"]


def test_a_batched_analysis_run_asks_the_model_several_at_a_time_and_keeps_each_answer_its_own(
        server, openai_env, tmp_path, monkeypatch):
    """One run for every symbol of a timeframe (the daily schedule's) asks the model
    TRADING_LLM_CONCURRENCY at a time (never more), each partition gets the analysis of its own
    chart, in partition order, and one bad answer stays its symbol's NO_TRADE."""
    from trading_pipeline.graph.assets.batch import range_tags
    from trading_pipeline_tests.adapters.openai.local_server import context_of

    monkeypatch.setenv("TRADING_LLM_CONCURRENCY", "3")
    environment = {**openai_env, "TRADING_LLM_CONCURRENCY": "3"}
    answer = good(delay=0.3)

    def reply(body):  # MSFT's answer is not JSON; the others are good
        return Reply(200, completion("no json here")) if context_of(body)["symbol"] == "MSFT" else answer(body)

    server.reset(default=reply)
    strategies = parse_strategies(f"strategies:\n  - name: llm_batch\n    symbols: [{', '.join(BATCH)}]\n"
                                  "    timeframes: {1d: {period: 2y}, 1w: {period: 6y}}\n")
    defs = build_definitions(strategies, resources_from_env(environment))
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        result = defs.resolve_job_def("analyze_timeframe").execute_in_process(
            instance=instance, tags={**range_tags(f"{BATCH[0]}|1d", f"{BATCH[-1]}|1d"), AS_OF_TAG: AS_OF})
    assert result.success
    assert server.max_in_flight == 3  # the analyst's bound, reached: the answers were awaited together
    analyses = result.output_for_node("ai_analyses")
    assert list(analyses) == [f"{s}|1d" for s in BATCH]
    asked = [context_of(b)["symbol"] for b in server.bodies() if image_parts(b)]
    assert sorted(asked) == sorted(BATCH)  # one request per chart
    for symbol in BATCH:
        analysis = analyses[f"{symbol}|1d"]
        assert analysis.symbol == symbol and analysis.timeframe == "1d"
        assert analysis.valid is (symbol != "MSFT")
    assert analyses["MSFT|1d"].signal == Action.NO_TRADE


def test_a_batched_decision_run_asks_for_its_consolidations_several_at_a_time(server, openai_env, tmp_path,
                                                                              monkeypatch):
    """The open's one decision run: the consolidation calls (one per symbol whose analyses propose a
    trade) go out TRADING_LLM_CONCURRENCY at a time; each decision is its own symbol's, and every
    decision is recorded once, in symbol order in the run's output."""
    from trading_pipeline.graph.assets.batch import range_tags
    from trading_pipeline_tests.adapters.openai.local_server import context_of

    monkeypatch.setenv("TRADING_LLM_CONCURRENCY", "3")
    environment = {**openai_env, "TRADING_LLM_CONCURRENCY": "3"}
    server.reset(default=good(delay=0.3))
    strategies = parse_strategies(f"strategies:\n  - name: llm_batch\n    symbols: [{', '.join(BATCH)}]\n"
                                  "    timeframes: {1d: {period: 2y}, 1w: {period: 6y}}\n"
                                  "    risk: {allow_short: true}\n")
    defs = build_definitions(strategies, resources_from_env(environment))
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        for timeframe in ("1d", "1w"):
            assert defs.resolve_job_def("analyze_timeframe").execute_in_process(
                instance=instance,
                tags={**range_tags(f"{BATCH[0]}|{timeframe}", f"{BATCH[-1]}|{timeframe}"), AS_OF_TAG: AS_OF}).success
        server.reset(default=good(delay=0.3))
        result = defs.resolve_job_def("decide_and_order").execute_in_process(
            instance=instance, tags={**range_tags(BATCH[0], BATCH[-1]), AS_OF_TAG: AS_OF})
    assert result.success
    consolidations = [context_of(b)["symbol"] for b in server.bodies() if "daily" in context_of(b)]
    assert len(consolidations) >= 3 and len(set(consolidations)) == len(consolidations)  # one call per symbol
    assert server.max_in_flight == 3  # asked together, never more than the bound
    decisions = result.output_for_node("trade_decisions")
    assert list(decisions) == sorted(BATCH)
    assert all(decisions[symbol].symbol == symbol for symbol in BATCH)


def test_the_models_words_reach_the_ui_as_plain_text_never_as_markdown(server, openai_env, tmp_path):
    """A hostile server's rationale with an image beacon and a link: shown as text in the analysis,
    the decision and the order metadata (markdown would load the image in the viewer's browser)."""
    hostile = "Strong trend. ![](http://attacker.invalid/beacon.png) [Approve the trade](http://attacker.invalid/x)"
    server.reset(default=good(rationale=hostile))
    analyses, decision, _order, metadata = run_spy(openai_env, tmp_path)
    assert analyses["1d"].valid and hostile in analyses["1d"].rationale  # valid text: kept, as words
    assert isinstance(metadata["rationale"], dg.TextMetadataValue) and hostile in metadata["rationale"].value
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        for asset in ("trade_decisions", "orders"):
            shown = instance.get_latest_materialization_event(dg.AssetKey(asset)).asset_materialization.metadata
            markdown = [name for name, value in shown.items() if isinstance(value, dg.MarkdownMetadataValue)
                        and "attacker.invalid" in value.value]
            assert markdown == [], f"{asset}: the model's words rendered as markdown in {markdown}"
    assert hostile in decision.rationale


@pytest.mark.parametrize("status", [401, 500])
def test_a_server_echoing_the_credentials_leaves_them_in_no_persisted_file(server, openai_env, tmp_path, monkeypatch,
                                                                          status):
    # A proxy password in OPENAI_BASE_URL reached the NO_TRADE reason, the event log and llm_calls as
    # the Basic credential the server echoed. Everything a user may share is searched: the Dagster instance (event log: metadata, check results,
    # failures, log lines; compute logs; asset values) and the trading database (llm_calls rows).
    import base64
    import json as jsonlib

    from trading_pipeline_tests.adapters.openai.local_server import Reply

    password = "Pr0xyPassw0rd99"
    basic = base64.b64encode(f"proxyuser:{password}".encode()).decode()
    base_url = server.base_url.replace("http://", f"http://proxyuser:{password}@")
    openai_env = {**openai_env, "OPENAI_BASE_URL": base_url}
    monkeypatch.setenv("OPENAI_BASE_URL", base_url)

    def echo(body):  # the headers the server received, repeated in its error
        request = server.requests[-1]
        return Reply(status, jsonlib.dumps({"error": {"message": f"bad request {request['headers']}",
                                                      "type": "invalid_request_error"}}))

    server.reset(default=echo)
    (tmp_path / "dagster").mkdir()
    defs = build_definitions(STRATEGIES, resources_from_env(openai_env))
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as instance:
        for timeframe in ("1d", "1w"):
            defs.resolve_job_def("analyze_timeframe").execute_in_process(
                partition_key=dg.MultiPartitionKey({"symbol": "SPY", "timeframe": timeframe}),
                instance=instance, tags={AS_OF_TAG: AS_OF}, raise_on_error=False)
        defs.resolve_job_def("decide_and_order").execute_in_process(
            partition_key="SPY", instance=instance, tags={AS_OF_TAG: AS_OF}, raise_on_error=False)
    # The server got, and echoed, the credentials: httpx makes `Authorization: Basic base64(user:password)`
    # of the URL's user:password (base64 of the password is not the password as written).
    assert all("authorization" in r["headers"] for r in server.requests)
    leaks = [path for path in tmp_path.rglob("*") if path.is_file()
             and any(secret.encode() in path.read_bytes() for secret in ("sk-test-graph-SECRET", "graph-SECRET", password,
                                                                         basic[:12], basic[-12:]))]
    assert leaks == []
