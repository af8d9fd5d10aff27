#!/bin/sh
# Creates the trading database beside Dagster's, owned by the same user. The postgres image
# runs this once, on an empty data volume (/docker-entrypoint-initdb.d). Idempotent.
set -e
psql -v ON_ERROR_STOP=1 --no-psqlrc --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  --set db="${TRADING_POSTGRES_DB:-trading}" <<'SQL'
SELECT format('CREATE DATABASE %I', :'db')
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'db')\gexec
SQL
