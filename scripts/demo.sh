#!/usr/bin/env bash
# The demo: greedy generation on the built-in tiny model (written on first run), a batch of two
# prompts of different lengths through one KV cache.
set -euo pipefail
build_dir=${1:-build}
"$build_dir/tools/moelora-generate" \
  --default_model_dir="$build_dir/default-model" \
  --prompt="1,17,42,99,7;3,8,64" \
  --max_new_tokens=12
