# syntax=docker/dockerfile:1
# One image with every binary of the pipeline: edge-agent, ingest-server and
# the emulators temperature, pressure, height and the fleet load generator.
# docker-compose.yml picks the program per service with `command:`.
#
#   docker build -t telemetry-pipeline .
#   docker run --rm telemetry-pipeline edge-agent --help

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

# --- build ----------------------------------------------------------------------
FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS builder
WORKDIR /src
COPY . .
# The cache mounts keep the registry and incremental target dir between
# builds; the binaries are copied out of the (unpersisted) target dir in the
# same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p edge-agent -p ingest-server -p emulators \
    && mkdir -p /out \
    && for bin in edge-agent ingest-server temperature pressure height fleet; do \
           cp "target/release/$bin" /out/; \
       done

# --- runtime --------------------------------------------------------------------
FROM debian:${DEBIAN_RELEASE}-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --home-dir /nonexistent --shell /usr/sbin/nologin telemetry
COPY --from=builder /out/ /usr/local/bin/
# Healthcheck helper (bash /dev/tcp; the slim image has no curl or wget).
COPY deploy/docker/http-ok /usr/local/bin/http-ok
# Every key with its default, for reference and for mounting a copy.
COPY deploy/edge-agent.example.toml deploy/ingest-server.example.toml /etc/telemetry/
USER telemetry:telemetry
ENV RUST_LOG=info
# edge-agent: sensors 7878, /metrics 9101; ingest-server: dashboard and /metrics 8080
EXPOSE 7878 9101 8080
CMD ["edge-agent", "--help"]
