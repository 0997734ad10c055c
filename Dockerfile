# headlock crawl job. Build: docker build -t headlock .   Run: docker run --rm headlock run --config /config/job.toml
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HEADLOCK_STORAGE_DIR=/data

RUN useradd --system --create-home --uid 10001 headlock \
    && mkdir /data \
    && chown headlock /data

WORKDIR /app
# Pinned dependencies first (requirements.lock): this layer is rebuilt only when the lock changes.
COPY requirements.lock ./
RUN pip install --no-cache-dir -r requirements.lock
# The project last, without resolving anything again.
COPY pyproject.toml README.md ./
COPY runner/ runner/
COPY handlers/ handlers/
COPY config/ config/
RUN pip install --no-cache-dir --no-deps .

USER 10001
WORKDIR /data
# Exec form: headlock itself receives SIGTERM, drains within workers.grace and releases its locks.
ENTRYPOINT ["headlock"]
CMD ["run"]
