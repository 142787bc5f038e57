#!/usr/bin/env bash
# The services the browser and PostgreSQL test tiers need, where this machine lets us make them: as root with
# apt-get (CI, a fresh container) it installs Debian's chromium and starts Debian's PostgreSQL, printing the
# TUNELOOP_TEST_DATABASE_URL to export. Anywhere else it changes nothing: those tiers are skipped, and the test
# run's summary lists them with the command that enables each. It never fails the run.
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "not root with apt-get: the browser and PostgreSQL tiers run only if already set up" >&2
    exit 0
fi
if [ ! -x /usr/bin/chromium ]; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
        || echo "could not install chromium: the browser tier will be skipped" >&2
fi
bash "$(dirname "$0")/postgres.sh" || echo "could not start PostgreSQL: its tier will be skipped" >&2
