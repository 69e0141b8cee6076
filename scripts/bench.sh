#!/usr/bin/env bash
# The benchmark: the worker vs the limits of this machine, each scenario with its
# baseline in the same run. Writes target/bench/summary.json and prints a table.
#   scripts/bench.sh           full run, release build (a few minutes)
#   scripts/bench.sh --smoke   tiny sizes, debug build (CI: keeps the script working)
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/ensure-rabbitmq.sh
scripts/ensure-s3s-fs.sh
scripts/ensure-rclone.sh # scenario 9's baseline

if [ "${1:-}" = "--smoke" ]; then
  cargo bench --locked --profile dev --bench pipeline -- --smoke
else
  cargo bench --locked --bench pipeline
fi
