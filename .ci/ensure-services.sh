#!/usr/bin/env bash
# Install the PostgreSQL and Redis servers the tests start privately, and the Chromium the view's browser
# test drives (Debian packages), when missing.
# A no-op when all are there; never fatal: without apt (or without root or network) the tests that
# need them are skipped with a reason instead.
set -u
have_postgres() { command -v pg_ctl >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; }
have_redis() { command -v redis-server >/dev/null 2>&1; }
# the view's browser test (tests/app/test_view.py): headless Chromium and its WebDriver
have_chromium() { [ -x /usr/bin/chromium ] && command -v chromedriver >/dev/null 2>&1; }
if have_postgres && have_redis && have_chromium; then
    exit 0
fi
missing=()
have_postgres || missing+=(postgresql)
have_redis || missing+=(redis-server)
have_chromium || missing+=(chromium chromium-driver)
if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-services: apt-get not available; ${missing[*]} missing (PostgreSQL/Redis/browser tests will be skipped)" >&2
    exit 0
fi
sudo=()
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo=(sudo -n); else
        echo "ensure-services: not root and no passwordless sudo; ${missing[*]} missing (tests will be skipped)" >&2
        exit 0
    fi
fi
echo "ensure-services: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
# the packages' own services are not started: the tests run private servers on free ports
{ "${sudo[@]}" apt-get install -y --no-install-recommends "${missing[@]}" \
  || { "${sudo[@]}" apt-get update -qq && "${sudo[@]}" apt-get install -y --no-install-recommends "${missing[@]}"; }; } \
  >/dev/null 2>&1 || echo "ensure-services: could not install ${missing[*]} (tests will be skipped)" >&2
exit 0
