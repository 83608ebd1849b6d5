# s3csi image: ghcr.io/s3csi/s3csi:<version> (the name the manifests in deploy/ use).
#   docker build -t ghcr.io/s3csi/s3csi:0.1.0 .

# Build stage: the release binary. protoc comes from the protoc-bin-vendored crate.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
COPY src src
COPY benches benches
RUN cargo build --release --locked --bin s3csi

# Runtime stage: fuse3 for fusermount3 and the FUSE tools, CA certificates for HTTPS endpoints.
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends fuse3 ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/s3csi /usr/local/bin/s3csi
ENTRYPOINT ["/usr/local/bin/s3csi"]
CMD ["--help"]
