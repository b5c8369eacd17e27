# moko_guard: a small image that runs `moko-guard serve`.
#
# Config and secrets are mounted as files: /etc/moko-guard/moko-guard.toml and,
# for `file:` references in it, /run/secrets/*. The SQLite store (if used)
# lives in the /var/lib/moko-guard volume.
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY moko_guard ./moko_guard
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
RUN groupadd --system --gid 10001 moko \
 && useradd --system --uid 10001 --gid moko --home-dir /var/lib/moko-guard --shell /usr/sbin/nologin moko \
 && mkdir -p /var/lib/moko-guard /etc/moko-guard \
 && chown moko:moko /var/lib/moko-guard
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER moko
WORKDIR /var/lib/moko-guard
ENV MOKO_GUARD_CONFIG=/etc/moko-guard/moko-guard.toml \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
EXPOSE 4180
VOLUME ["/var/lib/moko-guard"]
HEALTHCHECK --interval=30s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:4180/healthz', timeout=2).status == 200 else 1)"]
# Inside a container the guard must listen on all of the container's interfaces;
# publish the port only to the reverse proxy's network.
CMD ["moko-guard", "serve", "--host", "0.0.0.0", "--port", "4180"]
