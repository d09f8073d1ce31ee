# stowaway: durable store-and-forward DICOM adapter (C-STORE in, STOW-RS out).
#
#   docker build -t stowaway .
#   (with podman: podman build --format docker -t stowaway . ; podman's default OCI
#   format has no HEALTHCHECK and drops it)
#   docker run -p 2575:2575 -p 8080:8080 -v stowaway-data:/data stowaway serve \
#       --dicomweb-url https://healthcare.googleapis.com/v1/projects/.../dicomWeb
#
# Runs as uid/gid 10001 and writes only under /data (queue.db, spool/) and /tmp, so it
# also runs with a read-only root filesystem (Kubernetes readOnlyRootFilesystem: true)
# given a writable /tmp.

FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    STOWAWAY_DATA_DIR=/data \
    STOWAWAY_LOG_FORMAT=json

# The build context is trimmed by .dockerignore to what `pip install .` needs. The source
# tree is removed in the same layer, so the image holds only the installed package.
COPY . /src
RUN pip install /src \
 && rm -rf /src \
 && groupadd --system --gid 10001 stowaway \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin stowaway \
 && mkdir -p /data \
 && chown 10001:10001 /data

# A named volume mounted here starts with this directory's owner (10001).
VOLUME /data
WORKDIR /data
# Numeric, so that Kubernetes can verify runAsNonRoot without looking up a user name.
USER 10001:10001

# 2575: DICOM C-STORE SCP; 8080: /healthz, /readyz, /metrics.
EXPOSE 2575 8080

# There is no curl in slim images: ask the process's own /healthz with the standard
# library (any error or non-2xx status raises, so the exit code is non-zero).
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('STOWAWAY_HTTP_PORT', '8080'), timeout=4)"]

# stowaway handles SIGTERM itself (it drains associations and uploads), so it can be PID 1.
ENTRYPOINT ["stowaway"]
CMD ["serve"]
