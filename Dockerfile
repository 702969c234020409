# The Weir image for users: `docker build -t ghcr.io/weir-dev/weir:0.1.0 .`
#
# Build stage: the toolchain the project is tested with. Runtime stage: distroless `cc`
# (glibc, libgcc, CA certificates, no shell), running as the numeric non-root user 65532 so
# that `runAsNonRoot` can verify it without an /etc/passwd lookup. TLS (RabbitMQ, PostgreSQL,
# sinks) is rustls: no OpenSSL in the image.
#
# This machine has no registry to pull base images from; scripts/build-image.sh builds the
# same layout FROM scratch with buildah, and tests/image.rs runs it (see docs/image.md).
FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked && strip target/release/weir

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/weir /usr/local/bin/weir
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/weir"]
CMD ["operator"]
