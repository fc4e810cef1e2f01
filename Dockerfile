# syntax=docker/dockerfile:1
# The gateway server image: `gateway serve` with the `server` extra, as a non-root user, on a read-only root
# filesystem. It holds exactly what the tests ran on: every dependency comes from uv.lock through
# requirements/server.txt, pinned and hash-checked. Nothing secret or site-specific is baked in: mount the
# configuration, policies, models, TLS material, key set and audit HMAC key, and give it writable volumes for the
# audit trail and /tmp (docs/deploy.md; deploy/kubernetes/ does all of this).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# requirements/server-otel.txt adds OpenTelemetry tracing (tracing.enabled).
ARG REQUIREMENTS=requirements/server.txt

FROM ${PYTHON_IMAGE} AS build
ARG REQUIREMENTS
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY requirements/server.txt requirements/server-otel.txt requirements/sbom.txt ./requirements/
# The locked dependencies first (a layer that changes only with the lock), each wheel checked against its hash.
RUN python -m venv /opt/gateway \
    && /opt/gateway/bin/pip install --require-hashes --no-deps --only-binary=:all: -r "$REQUIREMENTS"
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN /opt/gateway/bin/pip install --no-deps --no-compile . \
    && /opt/gateway/bin/python -m compileall -q /opt/gateway/lib \
    && /opt/gateway/bin/pip check
# The bill of materials of what was installed, read by a locked tool that stays out of the final image.
RUN python -m venv /opt/sbom \
    && /opt/sbom/bin/pip install --require-hashes --no-deps --only-binary=:all: -r requirements/sbom.txt \
    && /opt/sbom/bin/cyclonedx-py environment --pyproject pyproject.toml --output-reproducible \
       --output-file /src/sbom.cdx.json /opt/gateway/bin/python

FROM ${PYTHON_IMAGE}
COPY --from=build /opt/gateway /opt/gateway
COPY --from=build /src/sbom.cdx.json /usr/share/doc/gateway/sbom.cdx.json
# No bytecode written at run time (the root filesystem is read-only); the install compiled it already.
ENV PATH=/opt/gateway/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 TMPDIR=/tmp
# A numeric user, so Kubernetes' runAsNonRoot can check it without a passwd entry.
USER 10001:10001
WORKDIR /var/lib/gateway
VOLUME ["/var/lib/gateway/audit", "/tmp"]
EXPOSE 50051 8081
# Needs health.listen: 0.0.0.0:8081 (or 127.0.0.1:8081) in the configuration.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s CMD ["python", "-m", "gateway.probe", "127.0.0.1:8081"]
ENTRYPOINT ["gateway"]
CMD ["serve", "--config", "/etc/gateway/gateway.yaml"]
