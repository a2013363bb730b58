# Two images from one file (classic builder and BuildKit alike):
#
#   docker build --target sink       -t cloudtrail-lake-shipper/sink:local .
#   docker build --target fluent-bit -t cloudtrail-lake-shipper/fluent-bit:local .
#
# `sink` runs `cloudtrail-sink` (also the emulator: `cloudtrail-sink emulator ...`) as uid 10001;
# `fluent-bit` is the official Fluent Bit image plus our YAML config, Lua filter and the mapping
# rules of mappings/*.yaml compiled during the build (a broken rule or a failing `examples:` entry
# fails the build with the compiler's `mappings/FILE.yaml:LINE: ...` message). The sink image
# also carries mappings/*.yaml (/usr/share/cloudtrail-lake-shipper/mappings) for
# `cloudtrail-sink mappings watch` (the compose `mappings` service, the Kubernetes sidecar).
# Base images are build args so a mirror or a locally made image can stand
# in; pip settings (PIP_INDEX_URL, PIP_FIND_LINKS, PIP_NO_INDEX, PIP_TRUSTED_HOST, PIP_CERT) may be
# passed as build args for private mirrors. See docs/deploy.md.
#
# The spool (docs/spool.md) is shared by both containers: both images hold the same skeleton,
# /var/spool/cloudtrail and its folders owned by uid/gid 10001, mode 2770 (setgid,
# group-writable), so a fresh named volume or hostPath prepared the same way is writable by the
# sink (10001) and by Fluent Bit (uid 0 or 10001 with gid 10001), and files Fluent Bit writes stay
# readable and deletable by the sink. Docker seeds a fresh named volume with the image folder's
# contents, owner and mode, so its root is 10001:10001 2770 too, whichever image seeds it.

ARG PYTHON_IMAGE=python:3.12.12-slim-bookworm
ARG FLUENT_BIT_IMAGE=fluent/fluent-bit:5.1.1

# ---------------------------------------------------------------------------------------------
# Build stage: the sink's virtualenv.
FROM ${PYTHON_IMAGE} AS sink-build
# Marks the containers of failed build steps (classic builder without --force-rm) for clean-up:
# docker container prune --filter label=cloudtrail-lake-shipper.build-stage (docs/deploy.md).
LABEL cloudtrail-lake-shipper.build-stage="sink-build"
ARG PIP_INDEX_URL PIP_FIND_LINKS PIP_NO_INDEX PIP_TRUSTED_HOST PIP_CERT
# sink/src/cloudtrail_sink/lua links to ../../../fluent-bit: the Lua modules ship in the package.
COPY fluent-bit/ /src/fluent-bit/
COPY sink/ /src/sink/
COPY deploy/docker/healthcheck.py /opt/cloudtrail-sink/healthcheck.py
RUN python3 -m venv /opt/cloudtrail-sink \
 && /opt/cloudtrail-sink/bin/pip install --no-cache-dir --disable-pip-version-check /src/sink

# ---------------------------------------------------------------------------------------------
# The sink (and emulator): non-root, nothing written outside its volumes, so
# `--read-only` / readOnlyRootFilesystem work.
FROM ${PYTHON_IMAGE} AS sink
ARG VERSION=0.1.0 REVISION=unknown
# Metadata first: on the vfs storage driver every instruction copies the whole file system, so
# instructions are cheapest while it is still the bare base image.
LABEL org.opencontainers.image.title="cloudtrail-lake-shipper-sink" \
      org.opencontainers.image.description="Delivers spooled audit events to AWS CloudTrail Lake (PutAuditEvents), at least once; also the local CloudTrail Data emulator" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"
ENV PATH=/opt/cloudtrail-sink/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CLOUDTRAIL_SPOOL_DIR=/var/spool/cloudtrail \
    CLOUDTRAIL_SINK_LISTEN=0.0.0.0:9464
EXPOSE 9464
# SIGTERM (the default stop signal): in-flight requests finish within --grace-seconds, exit 0.
HEALTHCHECK --interval=15s --timeout=6s --start-period=20s --retries=3 \
  CMD ["/opt/cloudtrail-sink/bin/python", "/opt/cloudtrail-sink/healthcheck.py"]
ENTRYPOINT ["cloudtrail-sink"]
CMD ["run"]
RUN groupadd --system --gid 10001 cloudtrail \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin cloudtrail \
 && install -d -m 2770 -o 10001 -g 10001 /var/spool/cloudtrail /var/spool/cloudtrail/tmp \
      /var/spool/cloudtrail/ready /var/spool/cloudtrail/failed /var/spool/cloudtrail/rejected \
      /var/spool/cloudtrail/quarantine /var/lib/cloudtrail-emulator \
 && install -d -m 0755 -o 10001 -g 10001 /var/lib/cloudtrail-mappings
COPY --from=sink-build /opt/cloudtrail-sink /opt/cloudtrail-sink
COPY mappings/ /usr/share/cloudtrail-lake-shipper/mappings/
USER 10001:10001

# ---------------------------------------------------------------------------------------------
# Build stage: mappings/*.yaml compiled to the data-only Lua file the filter loads, and the
# folder skeletons for the Fluent Bit image (which has no shell to make them). Comes after `sink`
# so that `--target sink` does not need it. The spool and tail folders are made inside a parent
# that is copied, so COPY keeps their own owner and mode (a COPY destination folder it has to
# create itself gets 0755).
FROM sink-build AS mappings
LABEL cloudtrail-lake-shipper.build-stage="mappings"
COPY mappings/ /src/mappings/
# --display-root: messages name mappings/40-sshd.yaml, as in the repository, not /src/mappings/...
RUN mkdir -p /out \
 && /opt/cloudtrail-sink/bin/cloudtrail-sink mappings compile /src/mappings --display-root /src \
      -o /out/mappings.lua \
 && install -d -m 2770 -o 10001 -g 10001 /out/spool/cloudtrail /out/spool/cloudtrail/tmp \
      /out/spool/cloudtrail/ready /out/spool/cloudtrail/failed /out/spool/cloudtrail/rejected \
      /out/spool/cloudtrail/quarantine /out/fluent-bit-state \
 && install -d -m 0755 /out/log/cloudtrail \
 && install -d -m 0755 -o 10001 -g 10001 /out/compiled-mappings

# ---------------------------------------------------------------------------------------------
# Fluent Bit with our configuration. The official image is distroless (no shell): COPY only.
FROM ${FLUENT_BIT_IMAGE} AS fluent-bit
ARG VERSION=0.1.0 REVISION=unknown
LABEL org.opencontainers.image.title="cloudtrail-lake-shipper-fluent-bit" \
      org.opencontainers.image.description="Fluent Bit with the CloudTrail Lake mapping filter; writes the spool the sink delivers" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"
COPY fluent-bit/ /fluent-bit/etc/
COPY --from=mappings /out/mappings.lua /fluent-bit/etc/mappings.lua
COPY --from=mappings --chown=10001:10001 /out/spool/ /var/spool/
# fluent-bit.yaml tails /var/log/cloudtrail/*.log. in_tail globs with GLOB_ERR, so a missing
# folder is "read error, check permissions" at every scan; an empty one only a debug line
# (fluent-bit plugins/in_tail/tail_scan_glob.c, flb_tail_scan).
COPY --from=mappings /out/log/ /var/log/
# Tail positions: /fluent-bit/state (fluent-bit.yaml), /var/lib/fluent-bit (the Kubernetes one).
COPY --from=mappings --chown=10001:10001 /out/fluent-bit-state/ /fluent-bit/state/
COPY --from=mappings --chown=10001:10001 /out/fluent-bit-state/ /var/lib/fluent-bit/
# Mount point of the compose `compiled-mappings` volume: owned by 10001 in both images, so a
# fresh volume is writable by `mappings watch` whichever container mounts it first.
COPY --from=mappings --chown=10001:10001 /out/compiled-mappings/ /var/lib/cloudtrail-mappings/
ENV CLOUDTRAIL_SPOOL_DIR=/var/spool/cloudtrail \
    CLOUDTRAIL_MAPPINGS=/fluent-bit/etc/mappings.lua
CMD ["-c", "/fluent-bit/etc/fluent-bit.yaml"]
