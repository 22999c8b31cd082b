# One image for all three roles; the command picks the role:
#   docker run IMAGE replica   (PRIVDIGIT_PARTY, PRIVDIGIT_MODEL, PRIVDIGIT_PEER_URL, ...)
#   docker run IMAGE dealer
# Every role needs its own credentials folder (PRIVDIGIT_CREDENTIALS; `python -m service certs`),
# mounted from outside, never baked in. See docker-compose.yml.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu \
    PRIVDIGIT_HOST=0.0.0.0

WORKDIR /app
COPY pyproject.toml README.md ./
COPY service ./service
COPY clients ./clients
# The versions that matter are pinned in pyproject.toml (torch, fastapi, uvicorn, httpx).
# hadolint ignore=DL3013
RUN pip install --no-cache-dir '.[service]' \
    && useradd --system --uid 10001 --no-create-home privdigit

USER 10001
EXPOSE 8000 8001 8002
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
    CMD ["python", "-c", "import os, ssl, urllib.request as u; e = os.environ; tls = bool(e.get('PRIVDIGIT_TLS_CERT')); ctx = ssl.create_default_context(cafile=e.get('PRIVDIGIT_TLS_CA')) if tls else None; u.urlopen('%s://localhost:%s/v1/health' % ('https' if tls else 'http', e.get('PRIVDIGIT_PORT', '8000')), context=ctx)"]
ENTRYPOINT ["python", "-m", "service"]
CMD ["--help"]
