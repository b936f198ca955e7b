source .device-deps/env.sh
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 tools/golden/make_peft_golden.py /tmp/peft > $OUT/peft.log 2>&1; echo "peft script rc=$?"
tail -12 $OUT/peft.log
rm -rf tests/data/peft && cp -r /tmp/peft tests/data/peft && tar czf $OUT/peft.tar.gz -C /tmp peft
bash scripts/gpu-check.sh
bash scripts/gpu-bench.sh 2>&1 | grep -E 'prefill|Benchmark' 
