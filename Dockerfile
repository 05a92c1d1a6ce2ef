# bulwark image: the one binary (webhook, node-controller, certs), non-root, no shell.
#   docker build -t bulwark:0.1.0 .
# Build stage: the workspace's locked dependencies, release profile.
FROM rust:1.89-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY webhook webhook
COPY certs certs
COPY tests tests
COPY e2e e2e
RUN cargo build --release --locked -p bulwark --bin bulwark \
    && strip target/release/bulwark

# Runtime: glibc and libgcc only (rustls, no OpenSSL); uid/gid 65532 as in deploy/.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/bulwark /usr/local/bin/bulwark
USER 65532:65532
EXPOSE 8443 9090 9091
ENTRYPOINT ["/usr/local/bin/bulwark"]
CMD ["webhook", "--help"]
