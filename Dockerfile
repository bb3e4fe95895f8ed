# The engine's image: `stream-app worker` by default, `stream-app collector` / `topics apply`
# by command. Runs as an unprivileged user; Python packages pinned by constraints.txt (the
# same pins CI tests with).
FROM python:3.11-slim
WORKDIR /app
RUN useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin engine
COPY pyproject.toml README.md constraints.txt ./
COPY stream_app ./stream_app
COPY agents ./agents
COPY evaluation ./evaluation
COPY topics ./topics
COPY schemas ./schemas
COPY config ./config
RUN pip install --no-cache-dir -c constraints.txt . \
    && mkdir -p /app/data && chown engine /app/data
ENV STREAM_APP_HOME=/app WEB_HOST=0.0.0.0 WEB_PORT=6066 LOG_FORMAT=json DATA_DIR=/app/data
USER engine
EXPOSE 6066 8088
ENTRYPOINT ["stream-app"]
CMD ["worker"]
