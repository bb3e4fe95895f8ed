FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY stream_app ./stream_app
COPY agents ./agents
COPY topics ./topics
COPY schemas ./schemas
COPY config ./config
RUN pip install --no-cache-dir -e .
ENV WEB_HOST=0.0.0.0 WEB_PORT=6066 LOG_FORMAT=json
EXPOSE 6066 8088
ENTRYPOINT ["stream-app"]
CMD ["worker"]
