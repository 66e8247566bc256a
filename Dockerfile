# ckpt-agent image: tini (PID 1, reaps and forwards signals) -> /entrypoint.sh -> ckpt-agent,
# which loads checkpoints and then runs the training command given as `docker run` arguments,
# or BT_START_COMMANDS. There is no default CMD: it would shadow BT_START_COMMANDS.
#   docker build --build-arg BASE_IMAGE=mirror.example/python:3.11-slim-bookworm -t ckpt-agent .
ARG BASE_IMAGE=python:3.11.14-slim-bookworm
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The glob keeps the pin to Debian's tini 0.19.0-1 while allowing each arch's binNMU suffix (+bN).
RUN apt-get update \
    && apt-get install -y --no-install-recommends 'tini=0.19.0-1*' \
    && rm -rf /var/lib/apt/lists/*

# Dependencies first, read from pyproject.toml, so a change to the sources does not reinstall them.
WORKDIR /opt/ckpt-agent
COPY pyproject.toml ./
RUN python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY README.md ./
COPY agent/ ./agent/
RUN pip install --no-cache-dir --no-deps . \
    && rm -rf build ./*.egg-info

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
