"""Create the chart bucket in MinIO (or any S3) if it is missing; docker compose runs this once
at start-up (service create-bucket), before the code location starts.

Reads the usual variables: TRADING_S3_BUCKET, AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION. Waits up to CREATE_BUCKET_WAIT_SECONDS (60) for the
server to answer. Exit code 0 when the bucket exists afterwards.
"""

from __future__ import annotations

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
    return 0


if __name__ == "__main__":
    sys.exit(main())
