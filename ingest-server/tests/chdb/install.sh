#!/usr/bin/env bash
# Installs chdb (ClickHouse in-process, from PyPI) for the ingest server's
# "schema on current ClickHouse" test. scripts/test may call this; it is
# quick when chdb is already there.
set -euo pipefail
cd "$(dirname -- "${BASH_SOURCE[0]}")"
if python3 -c 'import chdb' 2>/dev/null; then
	exit 0
fi
python3 -m pip install --quiet --disable-pip-version-check -r requirements.txt
