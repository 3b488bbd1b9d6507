# Multi-stage build: compile in the Rust image, run in a small Debian image.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock rustfmt.toml ./
COPY crates ./crates
RUN cargo build --release --locked -p herald-server && strip target/release/herald

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 herald
COPY --from=build /src/target/release/herald /usr/local/bin/herald
USER herald
EXPOSE 8081
# Inside a container the node must listen on all interfaces, which Herald
# allows only with explicit secrets: set HERALD_JWT_SECRET and HERALD_API_KEY.
ENV HERALD_LISTEN=0.0.0.0:8081
ENTRYPOINT ["herald"]
CMD ["serve"]
