#!/usr/bin/env python3
"""Builds tiny random HF models and the reference outputs the C++ golden tests compare against.

Runs on the GPU machine (python3 there has torch, transformers, safetensors); no network needed.
For each fixture it writes <out>/<name>/ with:
  config.json, model.safetensors   -- save_pretrained(safe_serialization=True), fp32
  reference.safetensors            -- input_ids.<i> [T_i] int64, logits.<i> [T_i, vocab] fp32 from a
                                      full forward of sequence i alone (eager attention, CPU, fp32),
                                      greedy.<i> [8] int64: greedy continuation by full recompute
  fixture.json                     -- versions, seeds, the smallest top-1/top-2 logit gap on the
                                      greedy path (how robust the greedy check is)

Usage: python3 tools/golden/make_golden.py OUT_DIR [--weight-std 0.1]

Also records in fixture.json how far transformers' own bf16 forward on CUDA is from its fp32
logits (relative error), the yardstick for our bf16 tolerance.
"""
import argparse
import copy
import json
import os

import torch
import transformers
from safetensors.torch import save_file

SEED = 1234
PROMPT_LENGTHS = (7, 12, 5)
GREEDY_TOKENS = 8
VOCAB = 128


def common(**overrides):
    base = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    base.update(overrides)
    return base


def fixtures():
    from transformers import (GemmaConfig, LlamaConfig, MistralConfig, Qwen2Config)
    llama3_rope = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                       original_max_position_embeddings=64, rope_theta=10000.0)
    try:
        llama = LlamaConfig(**common(rope_parameters=llama3_rope, tie_word_embeddings=False))
    except TypeError:
        llama = LlamaConfig(**common(rope_theta=10000.0, rope_scaling=llama3_rope,
                                     tie_word_embeddings=False))
    # Gemma-1 files say hidden_act "gelu" with no hidden_activation; transformers runs tanh GELU.
    gemma = GemmaConfig(**common(num_key_value_heads=1, head_dim=32, hidden_act="gelu",
                                 hidden_activation=None, tie_word_embeddings=True))
    qwen2 = Qwen2Config(**common(tie_word_embeddings=True, rope_theta=1000000.0,
                                 use_sliding_window=False))
    mistral = MistralConfig(**common(sliding_window=6, tie_word_embeddings=False))
    return {"llama_gqa_llama3": llama, "gemma": gemma, "qwen2_qkv_bias": qwen2,
            "mistral_sliding_window": mistral}


def relative_error(actual, expected):
    return float((actual.float() - expected).norm() / expected.norm())


def randomize(model, is_gemma, weight_std):
    """HF initialises norms to 1 (Gemma: 0) and biases to 0; randomise everything so that every
    weight, the norm convention and qwen2's qkv bias all show in the logits."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_((0.0 if is_gemma else 1.0) + 0.1 * torch.randn_like(param))
            else:
                param.normal_(0.0, weight_std)


def greedy(model, ids):
    tokens = list(ids)
    gaps = []
    for _ in range(GREEDY_TOKENS):
        logits = model(torch.tensor([tokens])).logits[0, -1]
        top = torch.topk(logits, 2).values
        gaps.append(float(top[0] - top[1]))
        tokens.append(int(torch.argmax(logits)))
    return tokens[len(ids):], min(gaps)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--weight-std", type=float, default=0.1)
    args = parser.parse_args()
    out = args.out
    torch.manual_seed(SEED)
    from transformers import AutoModelForCausalLM
    for name, config in fixtures().items():
        config._attn_implementation = "eager"
        torch.manual_seed(SEED)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
        model = model.to(torch.float32).eval()
        randomize(model, config.model_type == "gemma", args.weight_std)
        fixture_dir = os.path.join(out, name)
        model.save_pretrained(fixture_dir, safe_serialization=True)
        generator = torch.Generator().manual_seed(SEED + 1)
        reference = {}
        min_gap = float("inf")
        with torch.no_grad():
            for i, length in enumerate(PROMPT_LENGTHS):
                ids = torch.randint(0, VOCAB, (length,), generator=generator)
                logits = model(ids.unsqueeze(0)).logits[0].float()
                tokens, gap = greedy(model, ids.tolist())
                min_gap = min(min_gap, gap)
                reference[f"input_ids.{i}"] = ids.to(torch.int64).contiguous()
                reference[f"logits.{i}"] = logits.contiguous()
                reference[f"greedy.{i}"] = torch.tensor(tokens, dtype=torch.int64)
        save_file(reference, os.path.join(fixture_dir, "reference.safetensors"))
        hf_bf16_error = None
        if torch.cuda.is_available():
            bf16 = copy.deepcopy(model).to("cuda", torch.bfloat16)
            with torch.no_grad():
                hf_bf16_error = max(
                    relative_error(bf16(reference[f"input_ids.{i}"].unsqueeze(0).cuda())
                                   .logits[0].cpu(), reference[f"logits.{i}"])
                    for i in range(len(PROMPT_LENGTHS)))
        with open(os.path.join(fixture_dir, "fixture.json"), "w") as f:
            json.dump({"made_by": "tools/golden/make_golden.py", "seed": SEED,
                       "torch": torch.__version__, "transformers": transformers.__version__,
                       "attn_implementation": "eager", "prompt_lengths": list(PROMPT_LENGTHS),
                       "greedy_tokens": GREEDY_TOKENS, "weight_std": args.weight_std,
                       "min_greedy_logit_gap": min_gap,
                       "hf_bf16_cuda_relative_error": hf_bf16_error},
                      f, indent=2)
        for extra in ("generation_config.json",):
            path = os.path.join(fixture_dir, extra)
            if os.path.exists(path):
                os.remove(path)
        size = sum(os.path.getsize(os.path.join(fixture_dir, f)) for f in os.listdir(fixture_dir))
        print(f"{name}: {size} bytes, min greedy gap {min_gap:.4f}, transformers bf16 relative "
              f"error {hf_bf16_error}", flush=True)


if __name__ == "__main__":
    main()
