#!/usr/bin/env bash
# Spark GPU discovery script (spark.{executor,worker,driver}.resource.gpu.discoveryScript):
# prints the GPUs nvidia-smi sees as {"name": "gpu", "addresses": ["0", "1", ...]}.
set -euo pipefail
addresses=$(nvidia-smi --query-gpu=index --format=csv,noheader | sed -e 's/^/"/' -e 's/$/"/' | paste -sd, -)
echo "{\"name\": \"gpu\", \"addresses\": [${addresses}]}"
