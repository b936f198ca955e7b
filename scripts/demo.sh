#!/usr/bin/env bash
# The demo: the built-in tiny llama with two LoRA experts and a token-level router (written on
# first run); two prompts of different lengths in one batch through one KV cache, every expert
# applied in the same pass, and the routing weights behind each generated token.
set -euo pipefail
build_dir=${1:-build}
"$build_dir/tools/moelora-generate" \
  --default_model_dir="$build_dir/default-model" \
  --prompt="1,17,42,99,7;3,8,64" \
  --max_new_tokens=8 \
  --show_routing
