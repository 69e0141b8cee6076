# Build stage: compile the release binary.
FROM rust:1.95-bookworm AS build
WORKDIR /src
ARG GIT_REVISION=unknown
ENV GIT_REVISION=${GIT_REVISION}
COPY Cargo.toml Cargo.lock build.rs ./
COPY src ./src
# The manifest names the benchmark target; cargo wants its file to exist.
COPY benches ./benches
RUN cargo build --release --locked --bin lesson-replay

# Runtime stage: a small image running as a non-root user.
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin lesson-replay
COPY --from=build /src/target/release/lesson-replay /usr/local/bin/lesson-replay
COPY examples /examples
USER 10001:10001
ENV LESSON_REPLAY_LOG_FORMAT=json
# 9090: /metrics, /healthz, /readyz; 8080: the ingress
EXPOSE 9090 8080
ENTRYPOINT ["lesson-replay"]
CMD ["worker"]
