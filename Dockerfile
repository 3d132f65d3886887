# syntax=docker/dockerfile:1

# ---- build ----
FROM rust:1-bookworm AS builder
WORKDIR /build

COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY migrations ./migrations
COPY openapi ./openapi
COPY assets ./assets
# A workspace member: cargo needs its manifest, the image never builds it.
COPY bench ./bench

# The cache mounts keep the crate registry and compiled dependencies between
# builds; the binary is copied out of the cached target directory.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/build/target \
    cargo build --release --locked --bin attune-telemetry \
    && install -D -m 0755 target/release/attune-telemetry /out/attune-telemetry

# ---- runtime ----
FROM debian:bookworm-slim

RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 attune \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin attune

COPY --from=builder /out/attune-telemetry /usr/local/bin/attune-telemetry

ENV ATTUNE_LISTEN=0.0.0.0:8080
EXPOSE 8080
USER attune

HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8080/healthz || exit 1

ENTRYPOINT ["attune-telemetry"]
CMD ["serve"]
