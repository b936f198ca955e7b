#!/usr/bin/env python3
"""Builds PEFT LoRA adapters for the tiny llama golden fixture and the logits the C++ adapter
tests compare against.

Runs where python3 has torch, transformers and peft (written for torch 2.11, transformers 5.17,
peft 0.21); no network needed. Reads the base model and the prompts from
tests/data/golden/llama_gqa_llama3 (made by tools/golden/make_golden.py) and writes to OUT_DIR:

  <adapter>/adapter_config.json, <adapter>/adapter_model.safetensors
                     -- PeftModel.save_pretrained (safetensors), README.md removed
  reference.safetensors
      input_ids.<i>                        [T_i] int64, copied from the base fixture
      <adapter>.logits.<i>                 [T_i, 128] fp32: the base model with that adapter alone,
                                           full forward of prompt i (eager attention, CPU, fp32)
      mix_r4_qv_0.3_r8_rslora_all_0.7.logits.<i>
                                           [T_i, 128] fp32: r4_qv and r8_rslora_all both active,
                                           each LoRA layer's scaling[name] multiplied by its weight
  fixture.json       -- versions, seeds, the configs used, the mixture weights

Every adapter's lora_A and lora_B are re-drawn from N(0, 0.1) after PEFT creates them, so B is not
zero and every adapted module shows in the logits. The script checks, with PEFT's own layers, that
each adapter got the modules, ranks and scalings the C++ loader computes from its config, that
the saved files reload to the same logits, and that the two-adapter model reduces to each adapter
alone at weights (1, 0) and (0, 1); it exits 1 (after writing) if any of that disagrees.

Usage: python3 tools/golden/make_peft_golden.py OUT_DIR
"""
import argparse
import json
import math
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no network there; PEFT checks the hub otherwise

import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BASE_DIR = os.path.join(REPO, "tests", "data", "golden", "llama_gqa_llama3")
SEED = 4321
INIT_STD = 0.1
NUM_PROMPTS = 3
NUM_LAYERS = 2
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
          "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
MIX = (("r4_qv", 0.3), ("r8_rslora_all", 0.7))
MIX_NAME = "mix_" + "_".join(f"{name}_{weight}" for name, weight in MIX)
COMMON = dict(lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", init_lora_weights=True)

# name -> LoraConfig keyword sets, tried in order until PEFT accepts one.
ADAPTERS = {
    "r4_qv": [dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])],
    "r8_rslora_all": [dict(r=8, lora_alpha=16, use_rslora=True, target_modules="all-linear")],
    "r6_patterns": [dict(r=6, lora_alpha=12, target_modules=list(PROJECTIONS),
                         rank_pattern={"o_proj": 2, "model.layers.1.mlp.down_proj": 3},
                         alpha_pattern={"down_proj": 3.0})],
    # PEFT refuses layers_to_transform with a regex target_modules; then the list form.
    "r4_layer1_mlp": [dict(r=4, lora_alpha=4, target_modules=r".*\.mlp\.(gate|up)_proj",
                           layers_to_transform=[1]),
                      dict(r=4, lora_alpha=4, target_modules=["gate_proj", "up_proj"],
                           layers_to_transform=[1])],
}


def module_path(layer, proj):
    return f"model.layers.{layer}.{PARENT[proj]}.{proj}"


def expected_modules(name):
    """module path -> (rank, scaling), as core/adapter.cc derives them from the config."""
    expected = {}
    for layer in range(NUM_LAYERS):
        for proj in PROJECTIONS:
            path = module_path(layer, proj)
            if name == "r4_qv" and proj in ("q_proj", "v_proj"):
                expected[path] = (4, 8 / 4)
            elif name == "r8_rslora_all":
                expected[path] = (8, 16 / math.sqrt(8))
            elif name == "r6_patterns":
                rank = 2 if proj == "o_proj" else 3 if path == module_path(1, "down_proj") else 6
                alpha = 3.0 if proj == "down_proj" else 12
                expected[path] = (rank, alpha / rank)
            elif name == "r4_layer1_mlp" and layer == 1 and proj in ("gate_proj", "up_proj"):
                expected[path] = (4, 4 / 4)
    return expected


def load_base():
    model = AutoModelForCausalLM.from_pretrained(BASE_DIR, dtype=torch.float32,
                                                 attn_implementation="eager")
    return model.to(torch.float32).eval()


def lora_layers(model):
    """module path ("model.layers.0.self_attn.q_proj") -> LoraLayer."""
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            layers[name.removeprefix("base_model.model.")] = module
    return layers


def logits(model, input_ids):
    with torch.no_grad():
        return [model(input_ids=ids.unsqueeze(0), use_cache=False).logits[0].float().contiguous()
                for ids in input_ids]


def max_abs_diff(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def create_adapter(name, seed):
    """get_peft_model on a fresh base with the first config PEFT accepts; A and B re-drawn."""
    errors = []
    for kwargs in ADAPTERS[name]:
        torch.manual_seed(seed)
        try:
            config = LoraConfig(**COMMON, **kwargs)
            model = get_peft_model(load_base(), config)
        except ValueError as e:
            errors.append(f"{kwargs}: {e}")
            print(f"{name}: PEFT refused {kwargs}: {e}", flush=True)
            continue
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if ".lora_A." in param_name or ".lora_B." in param_name:
                    param.normal_(0.0, INIT_STD)
        return model.eval(), kwargs
    raise SystemExit(f"{name}: PEFT accepted none of its configs: {errors}")


def check_modules(name, model, adapter, problems):
    actual = {path: (layer.r[adapter], layer.scaling[adapter])
              for path, layer in lora_layers(model).items() if adapter in layer.r}
    expected = expected_modules(name)
    if set(actual) != set(expected):
        problems.append(f"{name}: PEFT adapted {sorted(actual)}, expected {sorted(expected)}")
        return
    for path, (rank, scaling) in sorted(expected.items()):
        got_rank, got_scaling = actual[path]
        if got_rank != rank or not math.isclose(got_scaling, scaling, rel_tol=1e-12):
            problems.append(f"{name}: {path} has rank {got_rank} scaling {got_scaling}, "
                            f"expected rank {rank} scaling {scaling}")


def set_mixture_weights(layers, base_scaling, weights):
    for path, layer in layers.items():
        for adapter, weight in weights.items():
            if adapter in layer.scaling:
                layer.scaling[adapter] = base_scaling[path][adapter] * weight


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    args = parser.parse_args()
    out = args.out
    os.makedirs(out, exist_ok=True)
    problems = []

    prompts = load_file(os.path.join(BASE_DIR, "reference.safetensors"))
    input_ids = [prompts[f"input_ids.{i}"].to(torch.int64) for i in range(NUM_PROMPTS)]
    reference = {f"input_ids.{i}": ids.contiguous() for i, ids in enumerate(input_ids)}

    base_logits = logits(load_base(), input_ids)
    base_error = max_abs_diff(base_logits, [prompts[f"logits.{i}"] for i in range(NUM_PROMPTS)])
    print(f"base model: max |logits - base fixture logits| = {base_error:.3g}", flush=True)
    if base_error > 1e-4:
        problems.append(f"base model logits differ from the base fixture by {base_error}")

    fixture_adapters = {}
    for index, name in enumerate(ADAPTERS):
        seed = SEED + index
        model, kwargs = create_adapter(name, seed)
        check_modules(name, model, "default", problems)
        adapter_logits = logits(model, input_ids)
        adapter_dir = os.path.join(out, name)
        model.save_pretrained(adapter_dir, safe_serialization=True)
        readme = os.path.join(adapter_dir, "README.md")
        if os.path.exists(readme):
            os.remove(readme)
        for i, tensor in enumerate(adapter_logits):
            reference[f"{name}.logits.{i}"] = tensor

        # The file holds exactly A and B of every expected module, under PEFT's key names.
        saved_keys = set(load_file(os.path.join(adapter_dir, "adapter_model.safetensors")))
        expected_keys = {f"base_model.model.{path}.lora_{factor}.weight"
                         for path in expected_modules(name) for factor in ("A", "B")}
        if saved_keys != expected_keys:
            problems.append(f"{name}: saved keys {sorted(saved_keys ^ expected_keys)} differ from "
                            "the expected ones")

        # The saved files alone must give the same logits.
        reloaded = PeftModel.from_pretrained(load_base(), adapter_dir).eval()
        reload_error = max_abs_diff(logits(reloaded, input_ids), adapter_logits)
        if reload_error > 1e-5:
            problems.append(f"{name}: reloaded adapter differs by {reload_error}")
        effect = max_abs_diff(adapter_logits, base_logits)
        with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
            saved_config = json.load(f)
        fixture_adapters[name] = {"seed": seed, "lora_config": kwargs,
                                  "saved_target_modules": saved_config.get("target_modules"),
                                  "lora_modules": len(expected_modules(name)),
                                  "max_abs_logit_change_from_base": effect}
        print(f"{name}: {len(lora_layers(model))} LoRA modules, config {kwargs}, files "
              f"{sorted(os.listdir(adapter_dir))}, max |logit change| {effect:.3g}, reload error "
              f"{reload_error:.3g}", flush=True)

    # The mixture: both adapters active in one PeftModel, scalings multiplied by the weights.
    (first, _), (second, _) = MIX
    mix = PeftModel.from_pretrained(load_base(), os.path.join(out, first), adapter_name=first)
    mix.load_adapter(os.path.join(out, second), adapter_name=second)
    mix.eval()
    names = [name for name, _ in MIX]
    try:
        mix.base_model.set_adapter(names)
    except (TypeError, ValueError) as e:
        print(f"LoraModel.set_adapter({names}) failed ({e}); setting each LoRA layer", flush=True)
        for layer in lora_layers(mix).values():
            layer.set_adapter(names)
    layers = lora_layers(mix)
    # The transformers model with the LoRA layers in it: PeftModel.forward looks up a single
    # active adapter's config, which a list of active adapters breaks.
    mix_model = mix.base_model.model
    for path, layer in layers.items():
        if list(layer.active_adapters) != names:
            problems.append(f"mixture: {path} has active adapters {layer.active_adapters}")
    base_scaling = {path: dict(layer.scaling) for path, layer in layers.items()}
    for weights, alone in (({first: 1.0, second: 0.0}, first), ({first: 0.0, second: 1.0}, second)):
        set_mixture_weights(layers, base_scaling, weights)
        error = max_abs_diff(logits(mix_model, input_ids),
                             [reference[f"{alone}.logits.{i}"] for i in range(NUM_PROMPTS)])
        print(f"mixture at {weights}: max |logits - {alone} alone| = {error:.3g}", flush=True)
        if error > 1e-5:
            problems.append(f"mixture at weights {weights} differs from {alone} alone by {error}")
    set_mixture_weights(layers, base_scaling, dict(MIX))
    for i, tensor in enumerate(logits(mix_model, input_ids)):
        reference[f"{MIX_NAME}.logits.{i}"] = tensor
    print(f"{MIX_NAME}: written", flush=True)

    save_file(reference, os.path.join(out, "reference.safetensors"))
    with open(os.path.join(out, "fixture.json"), "w") as f:
        json.dump({"made_by": "tools/golden/make_peft_golden.py",
                   "torch": torch.__version__, "transformers": transformers.__version__,
                   "peft": peft.__version__,
                   "base": "tests/data/golden/llama_gqa_llama3", "attn_implementation": "eager",
                   "seed": SEED, "lora_init_std": INIT_STD,
                   "prompt_lengths": [int(ids.numel()) for ids in input_ids],
                   "adapters": fixture_adapters,
                   "mixture": {"name": MIX_NAME, "weights": dict(MIX),
                               "rule": "each LoRA layer's scaling[adapter] multiplied by weight"},
                   "problems": problems},
                  f, indent=2)
    print(f"wrote {sorted(os.listdir(out))} to {out}", flush=True)
    if problems:
        print("PROBLEMS:\n  " + "\n  ".join(problems), flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
