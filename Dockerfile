# headlock crawl worker, and an Apify Actor as it is (.actor/actor.json points here). Configured by the platform's
# variables (ACTOR_..., APIFY_...), the run's INPUT and HEADLOCK_... variables, over config/actor.toml (the default
# CMD: handlers.crawl). Your own config file comes in by a mount and replaces the CMD:
#   -v $PWD/job.toml:/config/job.toml:ro ... headlock run --config /config/job.toml
#
#   docker build -t headlock .
#   docker run --rm --stop-timeout 40 -e APIFY_TOKEN -e ACTOR_DEFAULT_REQUEST_QUEUE_ID -e ACTOR_DEFAULT_DATASET_ID headlock
#
# Graceful stop: on SIGTERM headlock stops fetching, gives back prefetched requests, lets in-flight handlers finish
# within workers.grace (HEADLOCK_WORKERS__GRACE, default 30 s), then releases every lock it holds. The platform must
# wait longer than that before it sends SIGKILL: grace + ~10 s for the releases, i.e. `docker stop -t 40` /
# `docker run --stop-timeout 40` (Docker's default is 10 s), `stop_grace_period: 40s` in compose, and
# `terminationGracePeriodSeconds: 40` in Kubernetes. Raise them together with the grace.
#
# No tini / --init: headlock starts no child processes, so there are no zombies to reap, and it handles SIGTERM and
# SIGINT itself (a signal task; a second signal skips the grace). As PID 1 the kernel ignores signals it has no
# handler for, so a SIGTERM in the first moments of start-up, before the handlers exist, is dropped rather than
# fatal; the next one (or the stop timeout) ends it.
FROM python:3.11-slim-bookworm

# HEADLOCK_METRICS_HOST: inside a container the metrics server must listen on every interface to be reachable
# through a published port; it only starts when HEADLOCK_METRICS_PORT is set. HEADLOCK_HEALTH_FILE: the liveness
# file lives on the container's own /tmp, never on a shared volume.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HEADLOCK_STORAGE_DIR=/data \
    HEADLOCK_HEALTH_FILE=/tmp/headlock.health \
    HEADLOCK_METRICS_HOST=0.0.0.0

RUN useradd --system --no-log-init --create-home --uid 10001 headlock \
    && mkdir /data \
    && chown headlock /data

WORKDIR /app
# Pinned dependencies first (requirements.lock, with the server, metrics and aiohttp extras): this layer is rebuilt only
# when the lock changes.
COPY requirements.lock ./
RUN pip install --no-cache-dir -r requirements.lock
# The project last, without resolving anything again (tests/test_container.py installs it the same way).
COPY pyproject.toml README.md ./
COPY runner/ runner/
COPY handlers/ handlers/
RUN pip install --no-cache-dir --no-deps .
COPY config/ config/

USER 10001
WORKDIR /data
# Published only when metrics are on: -e HEADLOCK_METRICS_PORT=9090 -p 9090:9090
EXPOSE 9090
# Healthy while the heartbeat touched HEADLOCK_HEALTH_FILE within the last 15 s (it beats at least every 5 s,
# even with nothing to prolong). Exits 0 or 1 only, as Docker expects.
HEALTHCHECK --interval=15s --timeout=10s --start-period=30s --retries=3 CMD ["headlock", "health"]
# Exec form: headlock itself is PID 1 and receives SIGTERM.
ENTRYPOINT ["headlock"]
CMD ["run", "--config", "/app/config/actor.toml"]
