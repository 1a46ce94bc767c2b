# euroute container image.
#
#   docker build -t euroute:0.1.0 .
#
# The tag is the version in pyproject.toml, which is also the Helm chart's appVersion: the chart's
# default image is euroute:<appVersion> (push it to your registry and set image.repository).
# Stage 1 builds euroute's wheel and installs it with its dependencies into a virtualenv; the
# final stage copies only that virtualenv onto a fresh slim Python: no compiler, no build tools.
# It runs as uid 10001 with a read-only root filesystem; only /tmp needs to be writable
# (an emptyDir in Kubernetes).

ARG PYTHON_IMAGE=python:3.12-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY migrations ./migrations
COPY policies ./policies
RUN pip wheel --no-deps --wheel-dir /dist . \
 && python -m venv /opt/euroute \
 && /opt/euroute/bin/pip install /dist/euroute-*.whl \
 && /opt/euroute/bin/pip uninstall --yes pip

FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="euroute" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
# Nothing is written outside /tmp: no bytecode caches (the wheel's install compiled them
# already), HOME and the temporary directory (Prometheus multiprocess files under
# --workers N) in /tmp, and the embedded SQLite default there too (production sets
# EUROUTE_DATABASE_URL to PostgreSQL).
ENV PATH=/opt/euroute/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    TMPDIR=/tmp \
    EUROUTE_DATABASE_URL=sqlite+aiosqlite:////tmp/euroute.db
RUN groupadd --system --gid 10001 euroute \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /tmp \
      --shell /usr/sbin/nologin euroute
COPY --from=build /opt/euroute /opt/euroute
# An empty, root-owned working directory: no ./policies or ./.env to pick up by accident, so the
# policies are the ones mounted at EUROUTE_POLICY_DIR or, without it, those shipped in the wheel.
WORKDIR /app
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["euroute"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8080"]
