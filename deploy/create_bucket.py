"""Create the chart bucket in MinIO (or any S3) if it is missing; docker compose runs this once
at start-up (service create-bucket), before the code location starts.

Reads the usual variables: TRADING_S3_BUCKET, AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION. Waits up to CREATE_BUCKET_WAIT_SECONDS (60) for the
server to answer. Exit code 0 when the bucket exists afterwards.

With TRADING_CHART_BASE_URL set (docker compose sets it to the bucket's URL), the chart PNGs
(<TRADING_S3_PREFIX>/charts/*, nothing else) become readable without credentials, so the chart
links in the Dagster UI open in a browser for as long as the chart exists. Anyone who can reach
MinIO's port can then read the charts: it binds to 127.0.0.1 unless BIND_ADDRESS says otherwise.
"""

from __future__ import annotations

import json
import os
import sys
import time

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError, EndpointConnectionError

MISSING = ("404", "NoSuchBucket", "NotFound")


def ensure_bucket(client, bucket: str, region: str | None) -> bool:
    """True if the bucket was created, False if it was already there."""
    try:
        client.head_bucket(Bucket=bucket)
        return False
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") not in MISSING:
            raise
    arguments = {"Bucket": bucket}
    if region and region != "us-east-1":
        arguments["CreateBucketConfiguration"] = {"LocationConstraint": region}
    try:
        client.create_bucket(**arguments)
    except ClientError as error:  # created meanwhile by someone else: fine
        if error.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise
        return False
    return True


def charts_read_policy(bucket: str, prefix: str) -> dict:
    """Bucket policy: anonymous GetObject on the chart PNGs only (no listing, no other keys)."""
    charts = f"{prefix.strip('/')}/charts/*" if prefix.strip("/") else "charts/*"
    return {
        "Version": "2012-10-17",
        "Statement": [{
            "Sid": "PublicReadChartPngs",
            "Effect": "Allow",
            "Principal": {"AWS": ["*"]},
            "Action": ["s3:GetObject"],
            "Resource": [f"arn:aws:s3:::{bucket}/{charts}"],
        }],
    }


def main() -> int:
    bucket = os.environ.get("TRADING_S3_BUCKET") or "trading-charts"
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or None
    region = os.environ.get("AWS_DEFAULT_REGION") or None
    wait = float(os.environ.get("CREATE_BUCKET_WAIT_SECONDS", "60"))
    client = boto3.client("s3", endpoint_url=endpoint, region_name=region,
                          config=Config(retries={"max_attempts": 2}, connect_timeout=5, read_timeout=10))
    where = endpoint or "AWS S3"
    deadline = time.monotonic() + wait
    while True:
        try:
            created = ensure_bucket(client, bucket, region)
            break
        except EndpointConnectionError:
            if time.monotonic() > deadline:
                print(f"create-bucket: {where} did not answer within {wait:g} s", file=sys.stderr)
                return 1
            time.sleep(1)
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code")
            print(f"create-bucket: {where} refused bucket {bucket!r}: {code}: {error}", file=sys.stderr)
            return 1
    print(f"create-bucket: bucket {bucket!r} {'created' if created else 'already exists'} at {where}")
    if os.environ.get("TRADING_CHART_BASE_URL"):
        policy = charts_read_policy(bucket, os.environ.get("TRADING_S3_PREFIX") or "")
        try:
            client.put_bucket_policy(Bucket=bucket, Policy=json.dumps(policy))
        except ClientError as error:
            print(f"create-bucket: {where} refused the public-read policy for the charts: {error}. "
                  "Chart links in the UI will not open; unset TRADING_CHART_BASE_URL to get presigned links "
                  "instead, or allow bucket policies.", file=sys.stderr)
            return 1
        print(f"create-bucket: chart PNGs readable at {os.environ['TRADING_CHART_BASE_URL']}/"
              f"{policy['Statement'][0]['Resource'][0].split('/', 1)[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
