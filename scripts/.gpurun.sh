source .device-deps/env.sh
cmake -S . -B build-gpu -DCMAKE_BUILD_TYPE=Release > /dev/null 2>&1
cmake --build build-gpu -j 16 --target moelora-bench > $OUT/build.log 2>&1 || { grep error $OUT/build.log | head; exit 1; }
bash scripts/gpu-bench.sh 2>&1 | grep -E "(prefill|projection).*(mean)"
