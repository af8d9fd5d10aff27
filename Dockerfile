# The code location image (also used by the webserver and daemon), with Chromium for kaleido.
FROM python:3.11-slim-bookworm
RUN apt-get update && apt-get install -y --no-install-recommends chromium && rm -rf /var/lib/apt/lists/*
ENV BROWSER_PATH=/usr/bin/chromium DAGSTER_HOME=/opt/dagster/dagster_home
WORKDIR /opt/dagster/app
COPY pyproject.toml README.md ./
COPY trading_pipeline ./trading_pipeline
RUN pip install --no-cache-dir .
COPY deploy/dagster.yaml deploy/workspace.yaml /opt/dagster/dagster_home/
EXPOSE 4000
