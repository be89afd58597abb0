# engagement-cdc: multi-stage build, small runtime image, non-root user, state as a volume.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY migrations ./migrations
COPY benches ./benches
RUN cargo build --release --locked --bin engagement-cdc

FROM debian:bookworm-slim
# curl only for container healthchecks (GET /readyz, /stats).
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/engagement-cdc --shell /usr/sbin/nologin engagement \
 && mkdir -p /var/lib/engagement-cdc \
 && chown engagement /var/lib/engagement-cdc
COPY --from=build /src/target/release/engagement-cdc /usr/local/bin/engagement-cdc
USER engagement
WORKDIR /var/lib/engagement-cdc
ENV ENGAGEMENT_CDC__STATE__DIR=/var/lib/engagement-cdc/state \
    ENGAGEMENT_CDC__SERVER__LISTEN=0.0.0.0:59187
VOLUME /var/lib/engagement-cdc
EXPOSE 59187
ENTRYPOINT ["engagement-cdc"]
CMD ["run"]
