# One image for all three roles; the command picks the role:
#   docker run IMAGE replica   (PRIVDIGIT_PARTY, PRIVDIGIT_MODEL, PRIVDIGIT_PEER_URL, ...)
#   docker run IMAGE dealer
# Every role needs its own credentials folder (PRIVDIGIT_CREDENTIALS; `python -m service certs`),
# mounted from outside, never baked in. See docker-compose.yml and deploy/k8s (docs/deploy.md).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONPATH=/app \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu \
    PRIVDIGIT_HOST=0.0.0.0

WORKDIR /app
# The dependencies first, in a layer of their own: pyproject.toml's `service` extra (its versions
# are pinned there: torch, fastapi, uvicorn, httpx), so that a change to the code does not
# reinstall torch; only a change to pyproject.toml does.
COPY pyproject.toml ./
RUN python -c "import tomllib; extras = tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']; print('\n'.join(extras['service']))" > /tmp/service.txt \
    && pip install --no-cache-dir -r /tmp/service.txt \
    && rm /tmp/service.txt \
    && useradd --system --uid 10001 --no-create-home privdigit

# Then the code, run from /app as it is (`python -m service`): the service, the thin client and
# the web page (`python -m service web`). .dockerignore keeps everything else out.
COPY service ./service
COPY clients ./clients
COPY web ./web

USER 10001
EXPOSE 8000 8001 8002 8011
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
    CMD ["python", "-c", "import os, ssl, urllib.request as u; e = os.environ; tls = bool(e.get('PRIVDIGIT_TLS_CERT')); ctx = ssl.create_default_context(cafile=e.get('PRIVDIGIT_TLS_CA')) if tls else None; u.urlopen('%s://localhost:%s/v1/health' % ('https' if tls else 'http', e.get('PRIVDIGIT_PORT', '8000')), context=ctx)"]
ENTRYPOINT ["python", "-m", "service"]
CMD ["--help"]
