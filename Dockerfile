# The project's one image: the code location (gRPC server), and the Dagster webserver and
# daemon of docker-compose.yml. Chromium renders the charts (kaleido).
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    BROWSER_PATH=/usr/bin/chromium \
    DAGSTER_HOME=/opt/dagster/dagster_home

# Debian's Chromium for kaleido (no browser download at run time) and a font for chart text.
RUN apt-get update \
 && apt-get install -y --no-install-recommends chromium fonts-dejavu-core \
 && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin dagster

WORKDIR /opt/dagster/app
COPY pyproject.toml README.md ./
COPY trading_pipeline ./trading_pipeline
RUN pip install . && rm -rf build

# Instance and workspace for docker compose (PostgreSQL, gRPC code location), and the
# bucket-creation step. Named volumes mounted on storage/ and data/ start with this ownership.
COPY deploy/dagster.yaml deploy/workspace.yaml ${DAGSTER_HOME}/
COPY deploy/create_bucket.py ./deploy/
RUN mkdir -p ${DAGSTER_HOME}/storage /opt/dagster/data /opt/dagster/config \
 && chown -R dagster:dagster ${DAGSTER_HOME} /opt/dagster/data

USER dagster
EXPOSE 4000 3000
CMD ["dagster", "api", "grpc", "-h", "0.0.0.0", "-p", "4000", "-m", "trading_pipeline.definitions"]
