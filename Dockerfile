# mxspool container image.
#
#   docker build -t mxspool .
#   docker run -d --name mxspool -p 25:2525 -p 127.0.0.1:9090:9090 \
#     -v mxspool-spool:/var/lib/mxspool \
#     -v ./config.toml:/etc/mxspool/config.toml:ro mxspool
#
# The base images are pinned by tag; pin them by digest too for reproducible
# builds, e.g. FROM rust:1.95-slim-bookworm@sha256:<digest> (see
# `docker buildx imagetools inspect rust:1.95-slim-bookworm`).

# --- build: the same command CI and the README use, in release mode ---------
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# Dependencies first, so a source change does not rebuild them.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
 && echo 'fn main() {}' > src/main.rs \
 && echo '' > src/lib.rs \
 && cargo build --release --locked \
 && rm -rf src
COPY src ./src
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked \
 && install -m 0755 target/release/mxspool /usr/local/bin/mxspool

# --- runtime ----------------------------------------------------------------
FROM debian:bookworm-slim
# ca-certificates: delivery with tls = "verify" checks the primary's
# certificate against the system roots.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10025 mxspool \
 && useradd --system --uid 10025 --gid mxspool --home-dir /var/lib/mxspool \
      --shell /usr/sbin/nologin mxspool \
 && install -d -o mxspool -g mxspool -m 0750 /var/lib/mxspool \
 && install -d -m 0755 /etc/mxspool
COPY --from=build /usr/local/bin/mxspool /usr/local/bin/mxspool
COPY docker/config.toml /etc/mxspool/config.toml
ENV MXSPOOL_CONFIG=/etc/mxspool/config.toml
# Fewer malloc arenas: a small VPS keeps less memory after a large drain.
# Buffers of 128 KiB and more (large message bodies) are mapped and returned
# on free instead of raising glibc's threshold and fragmenting the heap: in
# the one-hour soak RSS stayed flat (+0.7% last quarter vs second, max 50
# MiB) where without it it crept up (+11%, max 71 MiB). See BENCHMARKS.md.
ENV MALLOC_ARENA_MAX=2 MALLOC_MMAP_THRESHOLD_=131072
USER mxspool
VOLUME ["/var/lib/mxspool"]
# SMTP listens on 2525 inside (no root needed): publish it as 25 (-p 25:2525).
EXPOSE 2525 9090
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["mxspool", "health"]
ENTRYPOINT ["mxspool"]
CMD ["serve"]
