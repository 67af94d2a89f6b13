#!/usr/bin/env bash
# The one release build of exwatch: the Dockerfile's builder stage runs this script, so do .ci/run and bench/run
# (which measures what it builds), so the image, CI and the benchmarks have the same binary. It is
# `cargo build --release`'s profile (Cargo.toml: tuned for size, fat LTO, stripped), linked statically against
# glibc (`crt-static`): no shared libraries to load or keep mapped, which is about 1.3 MB less resident memory
# (bench/RESULTS.md), and the runtime image needs no libgcc_s. Name resolution still works: glibc 2.34 and later
# have the `files` and `dns` sources built in. `cargo rustc` passes the flag to the final link only, so the
# dependencies are the same artifacts `cargo build --release` makes. `--locked`: Cargo.lock is the truth.
# usage: scripts/build-release.sh            -> target/release/exwatch
set -euo pipefail
cd "$(dirname "$0")/.."
cargo rustc --release --locked --bin exwatch -- -C target-feature=+crt-static
