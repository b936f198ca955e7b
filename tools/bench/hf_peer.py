#!/usr/bin/env python3
"""HF transformers + PEFT peer for the GPU benchmark: what the mixture of LoRA experts costs when
it is served the ways PEFT offers, on the same checkpoint, adapters and token counts as ours.

Runs on the GPU machine (torch, transformers 5.x, peft 0.21, safetensors; no network). Reads a HF
checkpoint (config.json + safetensors, families gemma / llama) and PEFT LoRA adapter dirs
(adapter_config.json + adapter_model.safetensors), as our C++ tools write them.

Usage:
  python3 tools/bench/hf_peer.py --model_dir DIR --adapter_dirs D0,D1,...,D7 \
      [--ks 2,4,8] [--cases base,single,kpass,loop,xlora] [--phases prefill,decode,generate] \
      [--prefill_batch 8 --prefill_len 512] \
      [--decode_batches 1,8,32,64 --decode_context 512 --decode_steps 64] \
      [--reps 10 --decode_reps 5 --warmup 2] [--xlora_top_ks 2] \
      [--xlora_decode_batches 1,8 --xlora_decode_steps 8] [--generate_batch 32] \
      [--dtype bf16] [--attn sdpa] [--seed 0] [--time_budget_s 0] [--json_out FILE]

Cases (every case sees the same token ids: random ids below the vocabulary, drawn from --seed per
shape, with --rotate pre-drawn batches cycled between reps):
  base    the checkpoint alone.
  single  PeftModel.from_pretrained on adapter 0: one LoRA active.
  kpass   the original DyLoRA-MoE method through PEFT: for each of K experts set_adapter(expert i)
          and a full prefill pass; the last-token logits mixed by per-sequence routing weights
          (softmax of random logits). Prefill only.
  loop    PEFT with the first K adapters active at once (base_model.set_adapter([names])): PEFT's
          per-layer loop over adapters, every weight 1 (the loop's cost, not a routed mixture).
  xlora   PEFT X-LoRA over the same K adapters (XLoraConfig: xlora_depth 1, no layerwise
          scalings, dense; then again with set_topk_lora(k) for each --xlora_top_ks k < K). Each
          forward is X-LoRA's scaling pass plus the real pass. X-LoRA refuses a KV cache (its
          scaling pass would write the cache twice; PEFT forces use_cache=False in its generate),
          so its decode recomputes the whole sequence every step, as PEFT's generate does.
Phases:
  prefill   one forward of batch x len with last-token logits only (logits_to_keep=1,
            use_cache=False); kpass: the K passes and the mix.
  decode    prefill the context with the KV cache (untimed), then `steps` single-token steps
            with the cache, greedy (argmax on the device, no host sync), timed together.
            X-LoRA: the same greedy loop without a cache (full recompute per step). One full
            untimed rep first.
  generate  model.generate(max_new_tokens=min_new_tokens=steps, greedy) at --generate_batch,
            base only, for reference: HF's own loop, context prefill included.
Timing: CUDA events around each rep, warm-up reps first, the median reported (the Python garbage
collector is off inside a row). LoRA weights run in --dtype (PEFT would upcast bf16 adapters to
fp32 by default; we keep them at the base's dtype).
Models are freed between cases (del, gc, empty_cache) so each case's peak is its own.
Run time with the defaults on an H100, Gemma-2B shapes (18 layers, vocab 256000, r=16 on all seven
projections, 8 adapters): base + single ~2 min, kpass + loop ~7 min, xlora ~4 min (K=16 would add
~6 min of loop decode alone). Where a command may run only so long, split with --cases, trim
--decode_reps / --decode_batches, or set --time_budget_s (rows past it are recorded as skipped;
a killed run still keeps its rows in --json_out).

JSON (--json_out, rewritten after every row so a killed run keeps what it measured):
{
  "card", "torch", "cuda", "transformers", "peft", "python": version strings,
  "dtype": "bf16", "adapter_dtype": dtype the LoRA weights ran in,
  "attn_implementation": what transformers used, "seed": int,
  "args": {every command-line option},
  "model": {"model_dir", "model_type", "vocab_size", "hidden_size", "intermediate_size",
            "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
            "max_position_embeddings", "tie_word_embeddings", "params", "weights_gib"},
  "adapters": [{"dir", "r", "lora_alpha", "use_rslora", "target_modules"}, ...],
  "xlora_config": {the XLoraConfig fields we set},
  "warnings": [str, ...],
  "started": ISO time, "finished": ISO time or null while running, "wall_s": float,
  "cases": [row, ...]
}
Every row has every key below (null where it does not apply), except "error", which only a
failed or skipped row has:
  "case"            base | single | kpass | loop | xlora (a setup failure of kpass and loop
                    together says kpass+loop)
  "K"               adapters in play (base 0, single 1)
  "top_k"           X-LoRA top-k (null: dense, and every other case)
  "phase"           prefill | decode | generate | setup (setup: the case failed before measuring)
  "batch"           sequences
  "len"             prefill: tokens per sequence; decode / generate: context tokens per sequence
  "steps"           decode / generate: new tokens per sequence timed; prefill: null
  "kv_cache"        whether decode used a KV cache (false for X-LoRA); prefill: false
  "ms"              median ms: prefill per forward pass (kpass: all K passes + the mix);
                    decode and generate per step (one new token for every sequence)
  "ms_min", "ms_max"  fastest and slowest timed rep, same unit as "ms"
  "ms_reps"         every timed rep in order, same unit (decode is CPU-launch-bound in eager
                    HF and PEFT, so whole reps can run slow when the host is busy: see the spread)
  "reps"            timed reps (after the warm-up)
  "tok_s"           tokens per second: prefill batch*len*1000/ms; decode and generate
                    batch*1000/ms
  "peak_gib"        torch.cuda.max_memory_allocated over the timed reps (weights included),
                    GiB; decode: context prefill included
  "peak_steps_gib"  decode only: the peak during the timed steps alone
  "weights_gib"     bytes of the model's parameters and buffers as run (base + adapters
                    (+ X-LoRA classifier)), GiB
  "adapters_loaded" LoRA adapters resident in the model
  "diff_vs_base"    prefill only: max |last-token logits - the base model's| on the first input
                    (a check that the adapters took effect; 0 means they did not)
  "error"           the exception that stopped this row, or why it was skipped (the run goes
                    on); absent from rows that measured
"""
import argparse
import dataclasses
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no network on the GPU machine; PEFT asks the hub

import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from peft import PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

CASES = ("base", "single", "kpass", "loop", "xlora")
PHASES = ("prefill", "decode", "generate")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GIB = float(2**30)
ROW_KEYS = ("case", "K", "top_k", "phase", "batch", "len", "steps", "kv_cache", "ms", "ms_min",
            "ms_max", "ms_reps", "reps", "tok_s", "peak_gib", "peak_steps_gib", "weights_gib",
            "adapters_loaded", "diff_vs_base")  # + "error" on failed or skipped rows


# ---- command line ---------------------------------------------------------------------------

def int_list(text):
    """"2,4,8" -> [2, 4, 8]; "" or "none" -> []."""
    if text.strip().lower() in ("", "none"):
        return []
    return [int(part) for part in text.split(",") if part.strip()]


def name_list(text, allowed, what):
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in allowed]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {what} {unknown}; choose from {list(allowed)}")
    return names


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", required=True,
                   help="HF checkpoint dir (config.json + safetensors)")
    p.add_argument("--adapter_dirs", required=True, help="comma-separated PEFT LoRA adapter dirs")
    p.add_argument("--ks", type=int_list, default=[2, 4, 8],
                   help="mixture sizes (the first K adapters)")
    p.add_argument("--cases", type=lambda s: name_list(s, CASES, "case"), default=list(CASES))
    p.add_argument("--phases", type=lambda s: name_list(s, PHASES, "phase"), default=list(PHASES))
    p.add_argument("--prefill_batch", type=int, default=8)
    p.add_argument("--prefill_len", type=int, default=512)
    p.add_argument("--decode_batches", type=int_list, default=[1, 8, 32, 64])
    p.add_argument("--decode_context", type=int, default=512)
    p.add_argument("--decode_steps", type=int, default=64)
    p.add_argument("--reps", type=int, default=10, help="timed prefill reps")
    p.add_argument("--decode_reps", type=int, default=5, help="timed decode reps (each: steps)")
    p.add_argument("--warmup", type=int, default=2, help="untimed prefill reps first")
    p.add_argument("--rotate", type=int, default=3, help="pre-drawn input batches cycled per shape")
    p.add_argument("--xlora_top_ks", type=int_list, default=[2],
                   help="X-LoRA sparse runs after the dense one (each k < K); 'none' for none")
    p.add_argument("--xlora_decode_batches", type=int_list, default=[1, 8],
                   help="X-LoRA decode recomputes the sequence every step: keep these small")
    p.add_argument("--xlora_decode_steps", type=int, default=8)
    p.add_argument("--generate_batch", type=int, default=32, help="0: no generate reference")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--attn", default="sdpa", help="attn_implementation (sdpa, eager, ...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time_budget_s", type=float, default=0,
                   help="past this many seconds, skip the remaining rows (error: skipped); 0: none")
    p.add_argument("--json_out", default=None)
    args = p.parse_args(argv)
    args.adapter_dirs = [d.strip() for d in args.adapter_dirs.split(",") if d.strip()]
    for name in ("prefill_batch", "prefill_len", "decode_context", "decode_steps", "reps",
                 "decode_reps", "rotate", "xlora_decode_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    return args


# ---- small helpers --------------------------------------------------------------------------

def now_iso():
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def gib(num_bytes):
    return None if num_bytes is None else round(num_bytes / GIB, 4)


def model_bytes(model):
    """Bytes of parameters and buffers (tied weights once)."""
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total


def cast_adapter_weights(model, dtype):
    """PEFT upcasts bf16/fp16 adapters to fp32 unless told not to (and X-LoRA always does):
    run the LoRA weights in the base's dtype, as a bf16 server would."""
    for name, param in model.named_parameters():
        if "lora_" in name and param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)


def adapter_dtypes(model):
    return sorted({str(p.dtype).replace("torch.", "") for n, p in model.named_parameters()
                   if ".lora_A." in n or ".lora_B." in n})


def free_cuda():
    gc.collect()
    torch.cuda.empty_cache()


def cuda_ms(fn):
    """Runs fn once between two CUDA events on the current stream; returns elapsed ms."""
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def last_logits(output):
    return output.logits[:, -1, :]


class InputBank:
    """Seeded random token ids per (batch, length), the same for every case; `count` batches per
    shape so consecutive reps see different ids."""

    def __init__(self, vocab_size, seed, count):
        self.vocab_size, self.seed, self.count = vocab_size, seed, count
        self._cache = {}

    def get(self, batch, length):
        key = (batch, length)
        if key not in self._cache:
            seed = self.seed * 1_000_003 + batch * 10_007 + length
            generator = torch.Generator().manual_seed(seed)
            with torch.inference_mode(False):  # ordinary tensors, even when first asked for inside
                self._cache[key] = [
                    torch.randint(0, self.vocab_size, (batch, length), generator=generator).cuda()
                    for _ in range(self.count)]
        return self._cache[key]

    def routing_weights(self, batch, k):
        """Per-sequence mixture weights [batch, k]: softmax of seeded normal logits."""
        generator = torch.Generator().manual_seed(self.seed * 7_919 + batch * 31 + k)
        with torch.inference_mode(False):
            return torch.softmax(torch.randn(batch, k, generator=generator), dim=-1).cuda()


# ---- the benchmark --------------------------------------------------------------------------

class PeerBench:
    def __init__(self, args):
        self.args = args
        self.dtype = DTYPES[args.dtype]
        self.t0 = time.perf_counter()
        self.rows = []
        self.adapter_dtype = set()
        self.config = transformers.AutoConfig.from_pretrained(args.model_dir)
        self.bank = InputBank(self.config.vocab_size, args.seed, args.rotate)
        self.warnings = []
        self.result = {
            "card": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "python": platform.python_version(),
            "dtype": args.dtype,
            "adapter_dtype": None,
            "attn_implementation": None,
            "seed": args.seed,
            "args": {k: v for k, v in vars(args).items()},
            "model": self.model_summary(),
            "adapters": [self.adapter_summary(d) for d in args.adapter_dirs],
            "xlora_config": None,
            "warnings": self.warnings,
            "started": now_iso(),
            "finished": None,
            "wall_s": None,
            "cases": self.rows,
        }
        longest = max(args.prefill_len, args.decode_context + args.decode_steps)
        max_pos = getattr(self.config, "max_position_embeddings", None)
        if max_pos is not None and longest > max_pos:
            self.warn(f"sequences reach {longest} tokens, past max_position_embeddings {max_pos} "
                      "(RoPE extends; transformers may warn)")

    # -- output --

    def elapsed(self):
        return time.perf_counter() - self.t0

    def over_budget(self):
        budget = self.args.time_budget_s
        return budget > 0 and self.elapsed() > budget

    def skipped(self, **spec):
        budget = self.args.time_budget_s
        return self.add_row(**spec, error=f"skipped: past --time_budget_s {budget:g}")

    def log(self, message):
        print(f"[{time.perf_counter() - self.t0:7.1f}s] {message}", flush=True)

    def warn(self, message):
        self.warnings.append(message)
        self.log(f"WARNING: {message}")

    def model_summary(self):
        c = self.config
        keys = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
                "tie_word_embeddings")
        summary = {"model_dir": os.path.abspath(self.args.model_dir)}
        summary.update({k: getattr(c, k, None) for k in keys})
        summary.update({"params": None, "weights_gib": None})  # filled on the first load
        return summary

    @staticmethod
    def adapter_summary(adapter_dir):
        summary = {"dir": os.path.abspath(adapter_dir)}
        try:
            with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
                config = json.load(f)
            summary.update({k: config.get(k) for k in ("r", "lora_alpha", "use_rslora",
                                                        "target_modules")})
        except (OSError, ValueError) as e:
            summary["error"] = f"{type(e).__name__}: {e}"
        return summary

    def save(self, final=False):
        self.result["adapter_dtype"] = ",".join(sorted(self.adapter_dtype)) or None
        self.result["wall_s"] = round(time.perf_counter() - self.t0, 1)
        if final:
            self.result["finished"] = now_iso()
        if not self.args.json_out:
            return
        tmp = self.args.json_out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.result, f, indent=1)
            f.write("\n")
        os.replace(tmp, self.args.json_out)

    def add_row(self, **fields):
        row = {key: None for key in ROW_KEYS}
        row["kv_cache"] = False
        row.update(fields)
        extra = set(row) - set(ROW_KEYS) - {"error"}
        assert not extra, sorted(extra)
        self.rows.append(row)
        self.log(format_row(row))
        self.save()
        return row

    # -- models --

    def load_base(self):
        kwargs = dict(dtype=self.dtype, attn_implementation=self.args.attn)
        start = time.perf_counter()
        try:
            model = AutoModelForCausalLM.from_pretrained(self.args.model_dir, device_map="cuda",
                                                         **kwargs)
        except (ValueError, ImportError) as e:
            if "accelerate" not in str(e):  # device_map needs accelerate; anything else is real
                raise
            self.log(f"from_pretrained(device_map='cuda') failed ({e}); CPU, then .cuda()")
            model = AutoModelForCausalLM.from_pretrained(self.args.model_dir, **kwargs).cuda()
        model.eval()
        if self.result["model"]["params"] is None:
            self.result["model"]["params"] = sum(p.numel() for p in model.parameters())
            self.result["model"]["weights_gib"] = gib(model_bytes(model))
            self.result["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
        self.log(f"loaded {self.args.model_dir} in {time.perf_counter() - start:.1f}s")
        return model

    def adapted(self, model):
        """Common finishing of a PEFT-wrapped model."""
        cast_adapter_weights(model, self.dtype)
        model.eval()
        self.adapter_dtype.update(adapter_dtypes(model))
        return model

    def reference_logits(self, model):
        """Base model's last-token logits on the first prefill input (CPU fp32), or None."""
        if "prefill" not in self.args.phases:
            return None
        ids = self.bank.get(self.args.prefill_batch, self.args.prefill_len)[0]
        with torch.inference_mode():
            out = model(input_ids=ids, logits_to_keep=1, use_cache=False)
            return last_logits(out).float().cpu()

    # -- measurements (each returns the row's measured fields) --

    def measure_prefill(self, forward, batch, length, reference=None):
        inputs = self.bank.get(batch, length)
        diff = None
        if reference is not None:
            diff = float((forward(inputs[0]).float().cpu() - reference).abs().max())
        for i in range(self.args.warmup):
            forward(inputs[i % len(inputs)])
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times = [cuda_ms(lambda: forward(inputs[i % len(inputs)])) for i in range(self.args.reps)]
        peak = torch.cuda.max_memory_allocated()
        fields = timing_fields(times, tokens_per_unit=batch * length)
        fields.update(peak_gib=gib(peak), diff_vs_base=diff)
        if diff == 0.0:
            self.warn("adapters changed no logit (diff_vs_base 0): were they applied?")
        return fields

    def decode_once_kv(self, model, context, steps):
        """Untimed context prefill with the cache, then `steps` timed greedy steps.
        Returns (ms for the steps, peak bytes overall, peak bytes during the steps)."""
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        out = model(input_ids=context, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        token = last_logits(out).argmax(dim=-1, keepdim=True)
        del out
        torch.cuda.synchronize()
        peak_prefill = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()

        def steps_loop():
            nonlocal token
            for _ in range(steps):
                step = model(input_ids=token, past_key_values=cache, use_cache=True)
                token = last_logits(step).argmax(dim=-1, keepdim=True)

        ms = cuda_ms(steps_loop)
        peak_steps = torch.cuda.max_memory_allocated()
        return ms, max(peak_prefill, peak_steps), peak_steps

    def decode_once_recompute(self, model, context, steps):
        """X-LoRA: no cache; every step forwards the whole sequence so far (the first token,
        from the context alone, is untimed like the KV prefill)."""
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        out = model(input_ids=context, use_cache=False, logits_to_keep=1)
        sequence = torch.cat([context, last_logits(out).argmax(dim=-1, keepdim=True)], dim=1)
        del out

        def steps_loop():
            nonlocal sequence
            for _ in range(steps):
                out = model(input_ids=sequence, use_cache=False, logits_to_keep=1)
                sequence = torch.cat([sequence, last_logits(out).argmax(dim=-1, keepdim=True)], 1)

        ms = cuda_ms(steps_loop)
        peak = torch.cuda.max_memory_allocated()
        return ms, peak, peak

    def measure_decode(self, model, batch, steps, kv_cache=True):
        contexts = self.bank.get(batch, self.args.decode_context)
        once = self.decode_once_kv if kv_cache else self.decode_once_recompute
        # A full-length warm-up rep: the first pass through a new length of the growing cache
        # (or sequence) meets every tensor size for the first time, and the allocator's
        # cudaMallocs made the first timed rep ~4x slow with a shorter warm-up.
        once(model, contexts[-1], steps)
        results = [once(model, contexts[i % len(contexts)], steps)
                   for i in range(self.args.decode_reps)]
        fields = timing_fields([ms / steps for ms, _, _ in results], tokens_per_unit=batch)
        fields.update(peak_gib=gib(max(r[1] for r in results)),
                      peak_steps_gib=gib(max(r[2] for r in results)))
        return fields

    def measure_generate(self, model, batch, steps):
        contexts = self.bank.get(batch, self.args.decode_context)

        def generate(ids):
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                           max_new_tokens=steps, min_new_tokens=steps, do_sample=False)

        generate(contexts[0])  # warm-up
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        reps = min(3, self.args.decode_reps)
        times = [cuda_ms(lambda: generate(contexts[i % len(contexts)])) / steps
                 for i in range(reps)]
        fields = timing_fields(times, tokens_per_unit=batch)
        fields.update(peak_gib=gib(torch.cuda.max_memory_allocated()))
        return fields

    # -- rows --

    def row(self, measure, model, **spec):
        """Runs measure() under inference_mode and records a row; an exception becomes the row's
        error and the run goes on."""
        if self.over_budget():
            return self.skipped(**spec)
        spec.setdefault("weights_gib", gib(model_bytes(model)) if model is not None else None)
        error = None
        gc.collect()
        gc.disable()  # no collector pauses inside the timed reps (as timeit does)
        try:
            with torch.inference_mode():
                fields = measure()
        except Exception as e:  # noqa: BLE001 -- one row must not end the run
            traceback.print_exc()
            sys.stderr.flush()
            error = f"{type(e).__name__}: {e}"[:2000]
        finally:
            gc.enable()
        if error is None:
            return self.add_row(**spec, **fields)
        free_cuda()  # after the except block, so the traceback's tensors are gone
        return self.add_row(**spec, error=error)

    def prefill_row(self, case, model, forward, reference=None, **spec):
        if "prefill" not in self.args.phases:
            return
        b, t = self.args.prefill_batch, self.args.prefill_len
        self.row(lambda: self.measure_prefill(forward, b, t, reference), model,
                 case=case, phase="prefill", batch=b, len=t, **spec)

    def decode_rows(self, case, model, batches=None, steps=None, kv_cache=True, **spec):
        if "decode" not in self.args.phases:
            return
        steps = steps or self.args.decode_steps
        for b in (self.args.decode_batches if batches is None else batches):
            self.row(lambda: self.measure_decode(model, b, steps, kv_cache), model,
                     case=case, phase="decode", batch=b, len=self.args.decode_context,
                     steps=steps, kv_cache=kv_cache, **spec)

    @staticmethod
    def prefill_forward(model):
        return lambda ids: last_logits(model(input_ids=ids, logits_to_keep=1, use_cache=False))

    # -- cases --

    def case_base(self):
        model = self.load_base()
        spec = dict(K=0, adapters_loaded=0)
        self.prefill_row("base", model, self.prefill_forward(model), **spec)
        self.decode_rows("base", model, **spec)
        b = self.args.generate_batch
        if "generate" in self.args.phases and b > 0:
            steps = self.args.decode_steps
            self.row(lambda: self.measure_generate(model, b, steps), model, case="base",
                     phase="generate", batch=b, len=self.args.decode_context, steps=steps,
                     kv_cache=True, **spec)
        return [model]

    def case_single(self):
        model = self.load_base()
        reference = self.reference_logits(model)
        pm = self.adapted(PeftModel.from_pretrained(
            model, self.args.adapter_dirs[0], adapter_name="e0", autocast_adapter_dtype=False))
        spec = dict(K=1, adapters_loaded=1)
        self.prefill_row("single", pm, self.prefill_forward(pm), reference, **spec)
        self.decode_rows("single", pm, **spec)
        return [pm, model]

    def case_kpass_loop(self, kpass, loop):
        """kpass and loop share one PeftModel; adapters are added as K grows, so a row at K has
        exactly K adapters resident."""
        model = self.load_base()
        reference = self.reference_logits(model)
        dirs = self.args.adapter_dirs
        names = [f"e{i}" for i in range(len(dirs))]
        pm, loaded = None, 0
        for k in self.ks:
            while loaded < k:
                if pm is None:
                    pm = PeftModel.from_pretrained(model, dirs[0], adapter_name=names[0],
                                                   autocast_adapter_dtype=False)
                else:
                    pm.load_adapter(dirs[loaded], adapter_name=names[loaded],
                                    autocast_adapter_dtype=False)
                loaded += 1
            self.adapted(pm)
            spec = dict(K=k, adapters_loaded=loaded)
            if kpass:
                weights = self.bank.routing_weights(self.args.prefill_batch, k)
                self.prefill_row("kpass", pm, self.kpass_forward(pm, names[:k], weights),
                                 reference, **spec)
            if loop:
                pm.base_model.set_adapter(names[:k])
                self.prefill_row("loop", pm, self.prefill_forward(pm), reference, **spec)
                self.decode_rows("loop", pm, **spec)
        return [pm, model]

    @staticmethod
    def kpass_forward(pm, names, weights):
        """One full pass per expert with that adapter alone; last-token logits mixed [B, V]."""
        def forward(ids):
            mixed = None
            for i, name in enumerate(names):
                pm.set_adapter(name)
                logits = last_logits(pm(input_ids=ids, logits_to_keep=1, use_cache=False))
                term = logits.float() * weights[:, i:i + 1]
                mixed = term if mixed is None else mixed + term
            return mixed
        return forward

    def xlora_config(self, k):
        from peft import TaskType, XLoraConfig  # here: a peft without X-LoRA fails this case only
        wanted = dict(
            task_type=TaskType.CAUSAL_LM,
            hidden_size=self.config.hidden_size,
            # XLoraModel loads adapter i under the name str(i) but activates the dict's keys:
            # the keys must be "0".."K-1" or no LoRA is applied at all.
            adapters={str(i): self.args.adapter_dirs[i] for i in range(k)},
            xlora_depth=1,
            layerwise_scalings=False,
            top_k_lora=None,
            enable_softmax=True,
        )
        fields = {f.name for f in dataclasses.fields(XLoraConfig)}
        config = XLoraConfig(**{key: v for key, v in wanted.items() if key in fields})
        self.result["xlora_config"] = {key: v for key, v in wanted.items()
                                       if key in fields and key not in ("adapters", "task_type")}
        return config

    def case_xlora(self):
        for k in self.ks:
            model = pm = None
            if self.over_budget():
                self.skipped(case="xlora", K=k, phase="setup")
                continue
            try:
                model = self.load_base()
                # X-LoRA refuses a model whose config asks for a cache.
                model.config.use_cache = False
                reference = self.reference_logits(model)
                torch.manual_seed(self.args.seed)  # the classifier's random init
                pm = self.adapted(peft.get_peft_model(model, self.xlora_config(k),
                                                      autocast_adapter_dtype=False))
                for top_k in [None] + [t for t in self.args.xlora_top_ks if 0 < t < k]:
                    pm.base_model.set_topk_lora(top_k)
                    spec = dict(K=k, top_k=top_k, adapters_loaded=k)
                    self.prefill_row("xlora", pm, self.prefill_forward(pm), reference, **spec)
                    self.decode_rows("xlora", pm, batches=self.args.xlora_decode_batches,
                                     steps=self.args.xlora_decode_steps, kv_cache=False, **spec)
            except Exception as e:  # noqa: BLE001 -- X-LoRA may not load in this peft
                traceback.print_exc()
                self.add_row(case="xlora", K=k, phase="setup",
                             error=f"{type(e).__name__}: {e}"[:2000])
            finally:
                del pm, model
                free_cuda()
        return []

    # -- driver --

    def run(self):
        args = self.args
        self.ks = []
        for k in args.ks:
            if 1 <= k <= len(args.adapter_dirs):
                self.ks.append(k)
            else:
                self.warn(f"K={k} skipped: {len(args.adapter_dirs)} adapter dirs given")
        self.ks = sorted(set(self.ks))
        self.log(f"card={self.result['card']} torch={torch.__version__} "
                 f"transformers={transformers.__version__} peft={peft.__version__} "
                 f"cases={args.cases} phases={args.phases} ks={self.ks}")
        plan = []
        for case in args.cases:
            if case == "base":
                plan.append(("base", self.case_base))
            elif case == "single":
                plan.append(("single", self.case_single))
            elif case in ("kpass", "loop") and "kpass+loop" not in [p[0] for p in plan]:
                plan.append(("kpass+loop", lambda: self.case_kpass_loop(
                    "kpass" in args.cases, "loop" in args.cases)))
            elif case == "xlora":
                plan.append(("xlora", self.case_xlora))
        for name, fn in plan:
            if self.over_budget():
                self.skipped(case=name, phase="setup")
                continue
            self.log(f"== {name}")
            held = []
            try:
                held = fn()
            except Exception as e:  # noqa: BLE001 -- one case must not end the run
                traceback.print_exc()
                sys.stderr.flush()
                self.add_row(case=name, phase="setup", error=f"{type(e).__name__}: {e}"[:2000])
            finally:
                del held
                free_cuda()
        self.save(final=True)
        print(format_table(self.rows), flush=True)
        if args.json_out:
            self.log(f"wrote {args.json_out}")


def timing_fields(times, tokens_per_unit):
    ms = statistics.median(times)
    return dict(ms=round(ms, 4), ms_min=round(min(times), 4), ms_max=round(max(times), 4),
                ms_reps=[round(t, 4) for t in times], reps=len(times),
                tok_s=round(tokens_per_unit * 1000.0 / ms, 1))


def format_row(row):
    text = f"{row['case']} K={row['K']}"
    if row["top_k"] is not None:
        text += f" top_k={row['top_k']}"
    text += f" {row['phase']}"
    if row["batch"] is not None:
        text += f" batch={row['batch']} len={row['len']}"
    if row["steps"] is not None:
        text += f" steps={row['steps']}"
    if row.get("error"):
        return f"{text}: ERROR {row['error']}"
    unit = "ms/pass" if row["phase"] == "prefill" else "ms/step"
    text += (f": {row['ms']:.3f} {unit} (min {row['ms_min']:.3f}, max {row['ms_max']:.3f}),"
             f" {row['tok_s']:.0f} tok/s, peak {row['peak_gib']:.2f} GiB")
    if row["peak_steps_gib"] is not None:
        text += f" (steps {row['peak_steps_gib']:.2f})"
    if row["diff_vs_base"] is not None:
        text += f", diff_vs_base {row['diff_vs_base']:.3g}"
    return text


TABLE_COLUMNS = (("case", 6), ("K", 2), ("top_k", 5), ("phase", 8), ("batch", 5), ("len", 5),
                 ("steps", 5), ("kv_cache", 8), ("ms", 10), ("tok_s", 11), ("peak_gib", 8),
                 ("diff_vs_base", 12))


def format_table(rows):
    def cell(value, width):
        if value is None:
            text = "-"
        elif isinstance(value, float):
            text = f"{value:.4g}" if abs(value) < 1e5 else f"{value:.0f}"
        else:
            text = str(value)
        return text.rjust(width)

    lines = [" ".join(name.rjust(width) for name, width in TABLE_COLUMNS)]
    for row in rows:
        if row.get("error"):
            lines.append(f"{str(row['case']).rjust(6)} {cell(row['K'], 2)} {row['phase']}: "
                         f"ERROR {row['error'][:200]}")
        else:
            lines.append(" ".join(cell(row[name], width) for name, width in TABLE_COLUMNS))
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("hf_peer.py needs a CUDA device")
    torch.manual_seed(args.seed)
    bench = PeerBench(args)
    bench.run()


if __name__ == "__main__":
    main()
