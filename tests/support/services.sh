#!/usr/bin/env bash
# Makes sure the servers the tests start are installed: PostgreSQL from Debian's packages.
# The tests start and stop their own server instances (in temp dirs, on 127.0.0.1).
set -u
if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
  echo "Installing PostgreSQL (Debian package) for the tests..." >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) >&2 \
    || echo "WARNING: could not install PostgreSQL; PostgreSQL tests will be skipped." >&2
else
  echo "WARNING: PostgreSQL is not installed and this user cannot install it; PostgreSQL tests will be skipped." >&2
fi
exit 0
