#!/usr/bin/env bash
# Debian's PostgreSQL on 127.0.0.1 with a database for the tests: installed, started, user and database made.
# Prints the TUNELOOP_TEST_DATABASE_URL to export. Needs root (CI runs as root).
set -euo pipefail
if ! command -v pg_ctlcluster >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
cluster=$(pg_lsclusters --no-header | awk 'NR==1 {print $1" "$2}')
pg_ctlcluster $cluster start >/dev/null 2>&1 || true
su postgres -c "psql -qtAc \"select 1 from pg_roles where rolname='tl'\"" | grep -q 1 \
    || su postgres -c "psql -qc \"create user tl with password 'tl' createdb\""
su postgres -c "psql -qtAc \"select 1 from pg_database where datname='tl'\"" | grep -q 1 \
    || su postgres -c "psql -qc 'create database tl owner tl'"
echo "export TUNELOOP_TEST_DATABASE_URL=postgresql+psycopg://tl:tl@127.0.0.1/tl"
