"""Chart storage: a local folder by default, S3 or MinIO in production.

Every store also gives a browser link to a chart, `public_url(key)`:
  - local: `<base>/<key>` on the loopback chart server (`python -m trading_pipeline.chart_server`,
    started by `make dev`); base = TRADING_CHART_BASE_URL, default http://127.0.0.1:<port>
    with port TRADING_CHART_SERVER_PORT (3001);
  - S3/MinIO with TRADING_CHART_BASE_URL (the bucket's URL, e.g. http://127.0.0.1:9000/trading-charts
    for the compose MinIO, whose create-bucket step makes charts/ public-read): `<base>/<object key>`,
    a link that works for as long as the chart exists;
  - S3/MinIO without it: a presigned GET link, valid PRESIGNED_URL_SECONDS (7 days, the most
    SigV4 allows). It expires, and it names the endpoint the pipeline uses (inside compose
    http://minio:9000, which a browser cannot reach), hence the base URL is preferred.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol
from urllib.parse import quote

from trading_pipeline.errors import ConfigError

DEFAULT_CHART_SERVER_PORT = 3001
PRESIGNED_URL_SECONDS = 7 * 24 * 3600  # the longest a SigV4 presigned URL may live


@dataclass(frozen=True)
class StoredChart:
    uri: str
    key: str
    sha256: str
    size_bytes: int


def chart_key(symbol: str, timeframe: str, as_of: datetime) -> str:
    """Stable, readable object key: charts/<symbol>/<timeframe>/<as_of>.png (UTC, to the second)."""
    return f"charts/{symbol}/{timeframe}/{as_of.strftime('%Y-%m-%dT%H%M%SZ')}.png"


def chart_server_port(environ: Mapping[str, str] | None = None) -> int:
    """TRADING_CHART_SERVER_PORT (default 3001): where the local chart server listens."""
    environ = os.environ if environ is None else environ
    text = (environ.get("TRADING_CHART_SERVER_PORT") or "").strip()
    if not text:
        return DEFAULT_CHART_SERVER_PORT
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ConfigError(f"TRADING_CHART_SERVER_PORT={text!r} is not a TCP port",
                          "set it to a free port number between 1024 and 65535, or unset it for 3001")
    return int(text)


def chart_base_url(mode: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The base of chart links for a store of `mode` ("local" | "s3"); None = presigned links (S3).

    TRADING_CHART_BASE_URL wins; else the local store's chart server on loopback.
    """
    environ = os.environ if environ is None else environ
    base = (environ.get("TRADING_CHART_BASE_URL") or "").strip().rstrip("/")
    if base:
        if not base.startswith(("http://", "https://")):
            raise ConfigError(f"TRADING_CHART_BASE_URL={base!r} is not an http(s) URL",
                              "set it to the URL charts are served under, e.g. http://127.0.0.1:3001 "
                              "(local) or http://127.0.0.1:9000/trading-charts (MinIO bucket)")
        return base
    if mode == "local":
        return f"http://127.0.0.1:{chart_server_port(environ)}"
    return None


class ChartStore(Protocol):
    def put_png(self, key: str, png: bytes) -> StoredChart: ...

    def get_png(self, key: str) -> bytes: ...

    def public_url(self, key: str) -> str: ...


class LocalChartStore:
    def __init__(self, root: Path, base_url: str | None = None):
        self.root = Path(root)
        self.base_url = (base_url or f"http://127.0.0.1:{DEFAULT_CHART_SERVER_PORT}").rstrip("/")

    def put_png(self, key: str, png: bytes) -> StoredChart:
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".png.partial")
        partial.write_bytes(png)
        partial.replace(path)  # atomic: a crash never leaves a half-written chart under the real name
        return StoredChart(path.resolve().as_uri(), key, hashlib.sha256(png).hexdigest(), len(png))

    def get_png(self, key: str) -> bytes:
        return (self.root / key).read_bytes()

    def public_url(self, key: str) -> str:
        """The chart on the loopback chart server (`make dev` starts it)."""
        return f"{self.base_url}/{quote(key)}"


class S3ChartStore:
    """S3/MinIO through a boto3 client (from dagster-aws S3Resource); creates the bucket if missing."""

    def __init__(self, client, bucket: str, prefix: str = "", base_url: str | None = None):
        self._client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.base_url = base_url.rstrip("/") if base_url else None
        self._bucket_ready = False

    def _object_key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _ensure_bucket(self) -> None:
        if self._bucket_ready:
            return
        from botocore.exceptions import ClientError

        try:
            self._client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
                raise
            self._client.create_bucket(Bucket=self.bucket)
        self._bucket_ready = True

    def put_png(self, key: str, png: bytes) -> StoredChart:
        self._ensure_bucket()
        digest = hashlib.sha256(png).hexdigest()
        object_key = self._object_key(key)
        self._client.put_object(Bucket=self.bucket, Key=object_key, Body=png, ContentType="image/png",
                                Metadata={"sha256": digest})
        return StoredChart(f"s3://{self.bucket}/{object_key}", key, digest, len(png))

    def get_png(self, key: str) -> bytes:
        return self._client.get_object(Bucket=self.bucket, Key=self._object_key(key))["Body"].read()

    def public_url(self, key: str) -> str:
        """`<base_url>/<object key>` when a base URL is set (a link that does not expire), else a
        presigned GET link valid PRESIGNED_URL_SECONDS."""
        object_key = self._object_key(key)
        if self.base_url:
            return f"{self.base_url}/{quote(object_key)}"
        return self._client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": object_key}, ExpiresIn=PRESIGNED_URL_SECONDS)
