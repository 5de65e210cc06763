#!/usr/bin/env bash
# Nightly run over a growing video collection, submitted to a Ray cluster as a Ray Job.
#   RECAP_CONFIG=ego4d-nightly.toml VIDEOS=/data/ego4d/v2/full_scale RAY_DASHBOARD=http://head:8265 ./nightly.sh
# cron:  0 2 * * *  cd /opt/recap && RECAP_CONFIG=... VIDEOS=... pipeline/recipes/nightly.sh >> nightly.log 2>&1
set -euo pipefail
: "${RECAP_CONFIG:?the run config, e.g. pipeline/recipes/ego4d-nightly.toml}"
: "${VIDEOS:?a folder or a list file of videos}"
RAY_DASHBOARD=${RAY_DASHBOARD:-http://127.0.0.1:8265}
RECAP=${RECAP:-recap}

# 1. Register what is new; unreadable files get failure records (exit 1) and the night goes on.
"$RECAP" ingest "$VIDEOS" --config "$RECAP_CONFIG" || [ $? -eq 1 ]
# 2. The plan: units to do per stage. Done units are skipped by their completion markers.
"$RECAP" run --config "$RECAP_CONFIG" --dry-run
# 3. The work, on the cluster: new videos, and yesterday's failures once more.
ray job submit --address "$RAY_DASHBOARD" -- "$RECAP" run --config "$RECAP_CONFIG" --retry-failed
