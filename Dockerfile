# minilet in a container image. The agent needs the host: run it privileged,
# in the host's network and PID namespaces, with the runtime socket, the
# CNI dirs, /var/log/pods, /var/lib/minilet and /var/run/netns mounted.

FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends protobuf-compiler \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY integration integration
COPY proto proto
# Static and non-PIE: the runtime execs it as the CNI plugin per operation.
RUN integration/build-release.sh

# Minimal final stage: the static binary, and iptables for the CNI plugins
# minilet execs (portmap, bridge ipMasq).
FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends iptables \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/minilet /usr/local/bin/minilet
COPY config/minilet.yaml /etc/minilet/minilet.yaml
COPY config/cni/ /etc/minilet/net.d/
ENTRYPOINT ["/usr/local/bin/minilet"]
CMD ["--config", "/etc/minilet/minilet.yaml"]
