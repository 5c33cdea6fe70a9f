# syntax=docker/dockerfile:1
# cxone-offboard container image: `make image` (docker build -t cxone-offboard:VERSION .).
# Build stage compiles the release binary with the locked dependencies; the runtime stage is
# distroless (glibc, CA certificates, no shell or package manager) and runs as uid 10001, so
# the pod can use a read-only root filesystem (the worker writes nothing but, at most, /tmp).

ARG RUST_IMAGE=rust:1.95-slim-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${RUST_IMAGE} AS build
WORKDIR /src
# rustls everywhere: no OpenSSL. aws-lc-sys (under rustls) needs only the C compiler the
# image already has. The whole context (see .dockerignore) so every target Cargo.toml names
# is present; config/default.toml is compiled into the binary.
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked --bin cxone-offboard \
    && install -D -m 0755 target/release/cxone-offboard /out/cxone-offboard

FROM ${RUNTIME_IMAGE}
ARG VERSION=0.0.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="cxone-offboard" \
      org.opencontainers.image.description="Consumes HR termination events from RabbitMQ and de-provisions NICE CXone users, with journals and evidence in S3" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.source="https://github.com/acme/cxone-offboard" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/cxone-offboard /usr/local/bin/cxone-offboard
USER 10001:10001
# /healthz, /readyz, /metrics (http.listen)
EXPOSE 9090
ENTRYPOINT ["/usr/local/bin/cxone-offboard"]
CMD ["worker"]
