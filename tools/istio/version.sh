#!/usr/bin/env bash
# The version name of the Istio pin (release branch + commit), used for the cache directory.
set -euo pipefail
source "$(dirname "$0")/release.env"
echo "$ISTIO_BRANCH-$ISTIO_COMMIT"
