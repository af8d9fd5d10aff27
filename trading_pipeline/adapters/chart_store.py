"""Chart storage: a local folder by default, S3 or MinIO in production."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class StoredChart:
    uri: str
    key: str
    sha256: str
    size_bytes: int


def chart_key(symbol: str, timeframe: str, as_of: datetime) -> str:
    """Stable, readable object key: charts/<symbol>/<timeframe>/<as_of>.png (UTC, to the second)."""
    return f"charts/{symbol}/{timeframe}/{as_of.strftime('%Y-%m-%dT%H%M%SZ')}.png"


class ChartStore(Protocol):
    def put_png(self, key: str, png: bytes) -> StoredChart: ...

    def get_png(self, key: str) -> bytes: ...


class LocalChartStore:
    def __init__(self, root: Path):
        self.root = Path(root)

    def put_png(self, key: str, png: bytes) -> StoredChart:
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".png.partial")
        partial.write_bytes(png)
        partial.replace(path)  # atomic: a crash never leaves a half-written chart under the real name
        return StoredChart(path.resolve().as_uri(), key, hashlib.sha256(png).hexdigest(), len(png))

    def get_png(self, key: str) -> bytes:
        return (self.root / key).read_bytes()


class S3ChartStore:
    """S3/MinIO through a boto3 client (from dagster-aws S3Resource); creates the bucket if missing."""

    def __init__(self, client, bucket: str, prefix: str = ""):
        self._client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")
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
