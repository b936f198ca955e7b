# syntax=docker/dockerfile:1
# moelora: the gRPC daemon (moelora-server), its client (moelora-cli) and the demo-asset writer
# (moelora-demo-assets) in a small runtime image. See docs/deploy.md.
#
# CPU, from Debian 12's libtorch (the default; builds anywhere, no network access beyond apt):
#   docker build -t moelora .
#   docker run --rm -p 50051:50051 -p 9090:9090 moelora          # serves the built-in demo model
#   docker run --rm -p 50051:50051 -p 9090:9090 -v /srv/llama:/models/base:ro \
#     -v /srv/experts:/experts:ro moelora --model_dir=/models/base --experts=math=/experts/math
#
# CUDA, from a libtorch CUDA zip (no internet needed: drop the zip into deploy/docker/libtorch/):
#   docker build -t moelora:cuda \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.6.3-devel-ubuntu24.04 \
#     --build-arg RUNTIME_IMAGE=nvidia/cuda:12.6.3-base-ubuntu24.04 \
#     --build-arg TORCH_DIST=zip \
#     --build-arg LIBTORCH_ZIP=libtorch-cxx11-abi-shared-with-deps-2.6.0+cu126.zip .
#   docker run --rm --gpus all -p 50051:50051 moelora:cuda --device=cuda ...
#
# Build arguments
#   BASE_IMAGE        build stage image. debian:12 (CPU) or an nvidia/cuda *-devel image whose
#                     distribution ships CMake >= 3.25, gRPC 1.51, abseil, prometheus-cpp
#                     (Ubuntu 24.04: nvidia/cuda:12.x-devel-ubuntu24.04; 22.04's CMake is too old).
#   RUNTIME_IMAGE     runtime stage image: the same distribution release as BASE_IMAGE
#                     (debian:12-slim; nvidia/cuda:12.x-base-ubuntu24.04 for CUDA).
#   TORCH_DIST        debian: Debian's libtorch-dev (CPU only). zip: a libtorch zip (CPU or CUDA,
#                     cxx11 ABI) named by LIBTORCH_ZIP.
#   LIBTORCH_ZIP      with TORCH_DIST=zip: a file name inside deploy/docker/libtorch/ (copied from
#                     the build context), or an https:// URL fetched with curl (needs network).
#   CMAKE_BUILD_TYPE  Release (default), RelWithDebInfo, Debug.
#
# Runtime
#   Ports: 50051 data plane (moelora.v1.Inference, grpc.health.v1, reflection), 50052 admin
#   (moelora.v1.Admin + health; loopback-only unless MOELORA_ADMIN_LISTEN=0.0.0.0:50052, which
#   wants MOELORA_ADMIN_TOKEN_FILE or mutual TLS), 9090 Prometheus /metrics.
#   Volumes (mount read-only, not declared as VOLUME): /models (base checkpoints, e.g.
#   /models/base), /experts (PEFT LoRA adapters and routers). /var/lib/moelora is the writable
#   home (the demo assets go there).
#   Flags: any --flag argument goes to moelora-server; MOELORA_<FLAG> variables (MOELORA_MODEL_DIR,
#   MOELORA_DEVICE, MOELORA_MANIFEST, ...) become flags too, arguments winning. With no model
#   directory given, the entrypoint writes and serves the built-in demo model. A first argument
#   that is not a flag runs that command instead (e.g. `moelora-cli health`).

ARG BASE_IMAGE=debian:12
ARG RUNTIME_IMAGE=debian:12-slim

# ---------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS build
ARG TORCH_DIST=debian
ARG LIBTORCH_ZIP=
ARG CMAKE_BUILD_TYPE=Release
ENV DEBIAN_FRONTEND=noninteractive

# Toolchain and libraries (the same list as scripts/install-deps.sh, less the test and format
# tools); Debian's libtorch only for TORCH_DIST=debian.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      build-essential cmake make pkg-config ca-certificates curl unzip \
      libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler \
      libabsl-dev prometheus-cpp-dev nlohmann-json3-dev libsentencepiece-dev \
 && if [ "$TORCH_DIST" = "debian" ]; then \
      apt-get install -y --no-install-recommends libtorch-dev libopenblas0-pthread; \
    fi \
 && rm -rf /var/lib/apt/lists/*

# A libtorch zip from the build context (deploy/docker/libtorch/ holds only a README unless one
# was dropped there) or from a URL, unpacked into /opt/libtorch.
COPY deploy/docker/libtorch/ /tmp/libtorch/
RUN set -eu; \
    if [ "$TORCH_DIST" = "zip" ]; then \
      zip="/tmp/libtorch/$LIBTORCH_ZIP"; \
      case "$LIBTORCH_ZIP" in \
        "") echo "TORCH_DIST=zip needs LIBTORCH_ZIP" >&2; exit 1 ;; \
        https://*) zip=/tmp/libtorch/download.zip; curl -fsSL -o "$zip" "$LIBTORCH_ZIP" ;; \
      esac; \
      unzip -q "$zip" -d /opt; \
      test -f /opt/libtorch/share/cmake/Torch/TorchConfig.cmake; \
    elif [ "$TORCH_DIST" != "debian" ]; then \
      echo "TORCH_DIST must be debian or zip, not '$TORCH_DIST'" >&2; exit 1; \
    fi; \
    rm -rf /tmp/libtorch

# Only what the build reads, so that editing docs or tests does not rebuild.
WORKDIR /src
COPY CMakeLists.txt ./
COPY proto/ proto/
COPY core/ core/
COPY server/ server/
COPY client/ client/
COPY tools/ tools/
RUN cmake -S /src -B /build -DCMAKE_BUILD_TYPE="$CMAKE_BUILD_TYPE" -DMOELORA_BUILD_TESTS=OFF \
      -DCMAKE_PREFIX_PATH=/opt/libtorch \
 && cmake --build /build -j "$(nproc)" \
      --target moelora-server moelora-cli moelora-demo-assets moelora_sentencepiece

# The three binaries, and every shared library they load that the runtime base image lacks.
COPY deploy/docker/collect-runtime-libs.sh deploy/docker/entrypoint.sh \
     deploy/docker/healthcheck.sh /tmp/docker/
# libmoelora_sentencepiece.so is loaded with dlmopen() by name (core/sentencepiece_shim.h),
# so ldd cannot see it: copied explicitly, and its own libraries collected with the rest.
RUN set -eu; \
    mkdir -p /opt/moelora/bin /opt/moelora/lib; \
    cp /build/server/moelora-server /build/client/moelora-cli \
       /build/tools/moelora-demo-assets /opt/moelora/bin/; \
    strip --strip-unneeded /opt/moelora/bin/*; \
    install -m 0644 /build/core/libmoelora_sentencepiece.so /opt/moelora/lib/; \
    install -m 0755 /tmp/docker/entrypoint.sh /opt/moelora/bin/moelora-entrypoint; \
    install -m 0755 /tmp/docker/healthcheck.sh /opt/moelora/bin/moelora-healthcheck; \
    extra=""; \
    if [ -d /opt/libtorch/lib ]; then extra=/opt/libtorch/lib; fi; \
    bash /tmp/docker/collect-runtime-libs.sh /opt/moelora/lib "$extra" \
      /opt/moelora/bin/moelora-server /opt/moelora/bin/moelora-cli \
      /opt/moelora/bin/moelora-demo-assets /opt/moelora/lib/libmoelora_sentencepiece.so

# ---------------------------------------------------------------------------------------------
FROM ${RUNTIME_IMAGE} AS runtime
# No packages: the build stage copied every library the binaries load (but the C and C++
# runtimes, which the same distribution release already has).
COPY --from=build /opt/moelora /opt/moelora
RUN echo /opt/moelora/lib > /etc/ld.so.conf.d/moelora.conf \
 && ldconfig \
 && ln -s /opt/moelora/bin/* /usr/local/bin/ \
 && groupadd --system --gid 10001 moelora \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/moelora --shell /usr/sbin/nologin \
      moelora \
 && mkdir -p /var/lib/moelora /models /experts \
 && chown moelora:moelora /var/lib/moelora

# Defaults for the container (each is a flag; arguments override): every port on all interfaces
# except admin, which stays on loopback until a token or mutual TLS protects it.
ENV MOELORA_LISTEN=0.0.0.0:50051 \
    MOELORA_METRICS_LISTEN=0.0.0.0:9090 \
    MOELORA_DEMO_DIR=/var/lib/moelora/demo \
    OMP_NUM_THREADS=4 \
    CUDA_CACHE_PATH=/tmp/cuda-cache

USER 10001:10001
WORKDIR /var/lib/moelora
EXPOSE 50051 50052 9090

# gRPC health (grpc.health.v1.Health/Check on the data port): SERVING only once the model is
# loaded and the start-up experts and routers are attached; NOT_SERVING while draining.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD ["/opt/moelora/bin/moelora-healthcheck"]

# The server drains on SIGTERM (health NOT_SERVING, running requests finish for up to
# --drain_timeout) and exits 0: give `docker stop` more than that (docker stop -t 45).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/opt/moelora/bin/moelora-entrypoint"]
CMD []
