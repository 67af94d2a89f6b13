#!/usr/bin/env bash
# The one release build of exwatch: the Dockerfile's builder stage runs this script, and so does .ci/run, so the
# image and CI compile the same way. `--locked`: Cargo.lock is the truth. The `dist` profile is `release` tuned
# for size (Cargo.toml), stripped.
# usage: scripts/build-release.sh            -> target/dist/exwatch
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --profile dist --locked --bin exwatch
