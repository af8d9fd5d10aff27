"""Alerts: the log always, and a webhook when TRADING_ALERT_WEBHOOK_URL is set.

The payload is `{"text": ...}`, which Slack incoming webhooks and most chat/webhook relays accept.
A failing webhook is logged, never raised: an alert must not fail the sensor that sends it.
The webhook URL is never logged: it usually carries a token (Slack's does). httpx logs every
request's full URL at INFO, which Celery workers (`dagster-celery worker start` logs at INFO) and a
Dagster instance with `python_log_level: INFO` write out, so its lines about the webhook are dropped.
"""

from __future__ import annotations

import logging
import os

_log = logging.getLogger(__name__)
_webhook_urls: set[str] = set()  # every webhook URL posted to, as httpx writes it


class _WebhookRequestsUnlogged(logging.Filter):
    """Drops httpx's log lines that name a webhook URL (`HTTP Request: POST <url> ...`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not _webhook_urls:
            return True
        message = record.getMessage()
        return not any(url in message for url in tuple(_webhook_urls))


_httpx_filter = _WebhookRequestsUnlogged()


def check_webhook_url(environ: dict[str, str] | None = None) -> None:
    """TRADING_ALERT_WEBHOOK_URL, checked when the code location loads: a typo would otherwise show
    only when the first alert goes nowhere. The URL is never echoed (it carries a token)."""
    from urllib.parse import urlsplit

    from trading_pipeline.errors import ConfigError

    url = (os.environ if environ is None else environ).get("TRADING_ALERT_WEBHOOK_URL", "").strip()
    if not url:
        return
    try:
        parts = urlsplit(url)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:
        ok = False
    if not ok:
        raise ConfigError("TRADING_ALERT_WEBHOOK_URL is not an http(s) URL (its value is not shown: it may hold a token)",
                          "set it to the full webhook URL, e.g. https://hooks.slack.com/services/…, or unset it "
                          "to log alerts only")


def send_alert(text: str, logger: logging.Logger | None = None, environ: dict[str, str] | None = None) -> bool:
    """Log `text` as a warning and post it to the webhook if one is configured. True if posted."""
    logger = logger or _log
    logger.warning(text)
    url = (os.environ if environ is None else environ).get("TRADING_ALERT_WEBHOOK_URL", "").strip()
    if not url:
        return False
    import httpx

    try:
        _webhook_urls.add(str(httpx.URL(url)))
        httpx_log = logging.getLogger("httpx")
        if _httpx_filter not in httpx_log.filters:
            httpx_log.addFilter(_httpx_filter)
        response = httpx.post(url, json={"text": text}, timeout=10.0)
        response.raise_for_status()
        return True
    except (httpx.HTTPError, httpx.InvalidURL) as error:
        # The URL may embed a token (Slack's does): name only its host.
        from urllib.parse import urlsplit

        logger.error(f"alert webhook at {urlsplit(url).hostname} failed: {type(error).__name__}")
        return False
