"""deploy/create_bucket.py against a real S3 server (moto on loopback): the bucket, and the
public-read policy for the chart PNGs that makes compose's chart links work."""

from __future__ import annotations

import importlib.util
import json

import boto3
import pytest
from botocore.exceptions import ClientError

from trading_pipeline_tests.deploy.conftest import REPO


def create_bucket_module():
    spec = importlib.util.spec_from_file_location("create_bucket", REPO / "deploy/create_bucket.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def s3_env(s3_endpoint, monkeypatch):
    for name, value in {"AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    return boto3.client("s3", endpoint_url=s3_endpoint)


def test_chart_pngs_only_become_public_read_with_a_base_url(s3_env, monkeypatch, capsys):
    module = create_bucket_module()
    monkeypatch.setenv("TRADING_S3_BUCKET", "charts-public")
    monkeypatch.setenv("TRADING_S3_PREFIX", "prod/")
    monkeypatch.setenv("TRADING_CHART_BASE_URL", "http://127.0.0.1:9000/charts-public")
    assert module.main() == 0
    policy = json.loads(s3_env.get_bucket_policy(Bucket="charts-public")["Policy"])
    [statement] = policy["Statement"]
    assert statement["Effect"] == "Allow" and statement["Action"] == ["s3:GetObject"]  # no listing
    assert statement["Resource"] == ["arn:aws:s3:::charts-public/prod/charts/*"]
    assert "chart PNGs readable at http://127.0.0.1:9000/charts-public/prod/charts/*" in capsys.readouterr().out


def test_without_a_base_url_the_bucket_stays_private(s3_env, monkeypatch):
    module = create_bucket_module()
    monkeypatch.setenv("TRADING_S3_BUCKET", "charts-private")
    monkeypatch.delenv("TRADING_CHART_BASE_URL", raising=False)
    assert module.main() == 0
    with pytest.raises(ClientError) as info:
        s3_env.get_bucket_policy(Bucket="charts-private")
    assert info.value.response["Error"]["Code"] == "NoSuchBucketPolicy"
    assert module.charts_read_policy("b", "")["Statement"][0]["Resource"] == ["arn:aws:s3:::b/charts/*"]
