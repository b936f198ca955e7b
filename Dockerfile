# Builds moelora from Debian 12's packages. Until the daemon lands (issue 4) the image runs the
# generate tool; mount a HF checkpoint at /models/base or use the built-in tiny model.
#   docker build -t moelora .
#   docker run --rm moelora --prompt=1,2,3
FROM debian:12 AS build
WORKDIR /src
COPY scripts/install-deps.sh scripts/
RUN bash scripts/install-deps.sh && rm -rf /var/lib/apt/lists/*
COPY . .
RUN cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DMOELORA_BUILD_TESTS=OFF \
 && cmake --build build -j "$(nproc)"

FROM debian:12-slim
# Runtime libraries only: libtorch's and abseil's shared objects.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libtorch1.13 libabsl20220623 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/build/tools/moelora-generate /usr/local/bin/moelora-generate
RUN useradd --system --uid 10001 moelora && mkdir -p /var/lib/moelora && chown moelora /var/lib/moelora
USER moelora
WORKDIR /var/lib/moelora
ENTRYPOINT ["/usr/local/bin/moelora-generate", "--default_model_dir=/var/lib/moelora/default-model", "--show_routing"]
