#!/usr/bin/env bash
# The one release build of exwatch: the Dockerfile's builder stage runs this script, and so does .ci/run, so the
# image and CI compile the same way (`--locked`: Cargo.lock is the truth; the release profile strips symbols).
# usage: scripts/build-release.sh            -> target/release/exwatch
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked --bin exwatch
