# minilet in a container image, built with nothing pulled or downloaded:
# FROM a base made locally (integration/image.sh base: debootstrap of
# Debian 12 minbase + iptables + Debian's CNI plugins, `docker import`), and
# the shipped binary from integration/build-release.sh (release, static,
# non-PIE: the runtime execs it on the host as the `minilet-cni` plugin, so
# it must need nothing from this image). `integration/image.sh build` does
# all three steps.
#
# The agent needs the host: run it privileged, in the host's network and PID
# namespaces, with the runtime socket, the CNI dirs, the pod logs dir, the
# state dir and /var/run/netns mounted at the same paths (see README.md,
# "Docker image", for the tested `docker run` line).
ARG BASE=minilet-base:bookworm
FROM ${BASE}
# integration/image.sh prunes the images it leaves dangling by this label.
LABEL io.minilet.image=agent
COPY target/minilet /usr/local/bin/minilet
COPY config/minilet.yaml /etc/minilet/minilet.yaml
COPY config/cni/ /etc/minilet/net.d/
ENTRYPOINT ["/usr/local/bin/minilet"]
CMD ["--config", "/etc/minilet/minilet.yaml"]
