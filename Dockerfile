# syntax=docker/dockerfile:1
# exwatch's image: a release build in a Rust builder stage, run on distroless (glibc, CA certificates, no shell)
# as the non-root user 65532. Build: `docker build -t exwatch .`; run: `docker run -p 9750:9750 exwatch`.
# The compile step is scripts/build-release.sh, the same script .ci/run executes, so CI builds what ships.
# Nothing secret is baked in: credentials, the admin token and the database URL arrive at run time as files or
# EXWATCH__* variables (deploy/kubernetes/secret.example.yaml).

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-slim-bookworm AS builder
WORKDIR /src

# Dependencies first, in their own layer: a build with stub sources compiles every crate of Cargo.lock and is
# reused until Cargo.toml or Cargo.lock change. The stubs' own artifacts are removed so the real build below
# cannot mistake them for up to date.
COPY Cargo.toml Cargo.lock ./
COPY vendor vendor
COPY scripts/build-release.sh scripts/build-release.sh
RUN mkdir -p src benches \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && echo 'fn main() {}' > benches/breaker.rs \
 && echo 'fn main() {}' > benches/inserts.rs \
 && echo 'fn main() {}' > benches/soak.rs \
 && scripts/build-release.sh \
 && rm -rf src benches target/release/exwatch target/release/deps/exwatch-* \
           target/release/deps/libexwatch-* target/release/.fingerprint/exwatch-*

# The application; .dockerignore keeps target/, .git and local databases out of the context.
COPY . .
RUN scripts/build-release.sh \
 && mkdir -p /out/var/lib/exwatch \
 && cp target/release/exwatch /out/exwatch

# base-nossl has CA certificates, tzdata, the nonroot user and name-service configuration; exwatch speaks TLS
# through rustls, so OpenSSL (in distroless/base and /cc) is dead weight. The binary is statically linked
# (scripts/build-release.sh), so it loads no library from the image.
FROM gcr.io/distroless/base-nossl-debian12:nonroot AS runtime
COPY --from=builder /out/exwatch /usr/local/bin/exwatch
# The working directory holds the SQLite file and the spool by default; Kubernetes mounts an emptyDir here
# because the root filesystem is read-only there.
COPY --from=builder --chown=65532:65532 /out/var/lib/exwatch /var/lib/exwatch
WORKDIR /var/lib/exwatch
USER 65532:65532
EXPOSE 9750
# exwatch shuts down in order on SIGTERM (readiness 503, polls finish, the call log drains, HTTP last) within
# server.shutdown_grace; a second signal exits at once.
STOPSIGNAL SIGTERM
# No ENV defaults: EXWATCH__* variables override the configuration file, so the image leaves them to the deployment.
# exwatch's own defaults already listen on 0.0.0.0:9750 and log JSON when standard error is not a terminal.
ENTRYPOINT ["/usr/local/bin/exwatch"]
CMD ["run"]
