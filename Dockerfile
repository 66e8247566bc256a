# ckpt-agent image: tini (PID 1, reaps and forwards signals) -> /entrypoint.sh -> ckpt-agent,
# which loads checkpoints and then execs the training command given as CMD / `docker run` args.
FROM python:3.11.14-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The glob keeps the pin to Debian's tini 0.19.0-1 while allowing each arch's binNMU suffix (+bN).
RUN apt-get update \
    && apt-get install -y --no-install-recommends 'tini=0.19.0-1*' \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/ckpt-agent
COPY pyproject.toml README.md ./
COPY agent/ ./agent/
RUN pip install --no-cache-dir .

COPY entrypoint.sh /entrypoint.sh
RUN chmod 0755 /entrypoint.sh \
    && groupadd --gid 10001 trainer \
    && useradd --create-home --uid 10001 --gid 10001 trainer

# Numeric so runtimes enforcing runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
WORKDIR /home/trainer

ENTRYPOINT ["tini", "--", "/entrypoint.sh"]
CMD ["python", "-c", "print('ckpt-agent: give the training command as the container arguments')"]
