// Greedy generation on a Hugging Face checkpoint, straight through core, optionally with a
// mixture of PEFT LoRA experts in one pass. With no --model_dir it uses a built-in tiny llama
// with four experts and a router (core/demo_assets), written deterministically on first use.
//
//   moelora-generate --prompt=1,5,9,2 --max_new_tokens=16 --show_routing
//   moelora-generate --model_dir=/models/llama --device=cuda --dtype=bf16 --prompt=...
//   moelora-generate --model_dir=... --experts=math=/ad/math,code=/ad/code --router=/r/mix
//   moelora-generate ... --weights=math:0.3,code:0.7      (or --pin=math)

#include <ATen/ATen.h>

#include <chrono>
#include <cstdint>
#include <iostream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "core/demo_assets.h"
#include "core/generation.h"
#include "core/mixture.h"
#include "core/model.h"
#include "core/router.h"
#include "core/status_macros.h"

ABSL_FLAG(std::string, model_dir, "",
          "HF checkpoint directory (config.json + safetensors); empty = the built-in tiny model");
ABSL_FLAG(std::string, default_model_dir, "build/demo-assets",
          "where the built-in demo assets are written on first use");
ABSL_FLAG(std::string, prompt, "1,17,42,99,7",
          "comma-separated prompt token ids; ';' separates "
          "prompts of a batch");
ABSL_FLAG(int64_t, max_new_tokens, 16, "tokens to generate per prompt");
ABSL_FLAG(std::string, device, "cpu", "cpu, cuda or cuda:N");
ABSL_FLAG(std::string, dtype, "auto", "auto (bf16 on cuda, fp32 on cpu), fp32, bf16 or fp16");
ABSL_FLAG(std::string, experts, "",
          "PEFT LoRA experts to attach, name=dir[,name=dir...]; with no --model_dir the built-in "
          "demo experts");
ABSL_FLAG(std::string, router, "",
          "router directory to attach (becomes the default); with no --model_dir the built-in one");
ABSL_FLAG(std::string, pin, "", "route every token to this expert");
ABSL_FLAG(std::string, weights, "", "explicit expert weights, name:w[,name:w...]");
ABSL_FLAG(bool, show_routing, false, "print the routing weights behind each generated token");
ABSL_FLAG(int64_t, pool_capacity, 8, "expert slots");
ABSL_FLAG(int64_t, pool_max_rank, 16, "rank rows per expert slot");

namespace {

absl::StatusOr<std::vector<std::vector<int64_t>>> ParsePrompts(const std::string& text) {
  std::vector<std::vector<int64_t>> prompts;
  for (absl::string_view part : absl::StrSplit(text, ';', absl::SkipWhitespace())) {
    std::vector<int64_t> ids;
    for (absl::string_view token : absl::StrSplit(part, ',', absl::SkipWhitespace())) {
      int64_t id = 0;
      if (!absl::SimpleAtoi(token, &id)) {
        return absl::InvalidArgumentError(
            absl::StrCat("--prompt: '", token, "' is not a token id"));
      }
      ids.push_back(id);
    }
    if (!ids.empty()) prompts.push_back(std::move(ids));
  }
  if (prompts.empty()) return absl::InvalidArgumentError("--prompt: no token ids");
  return prompts;
}

// "a=1,b=2" -> {{"a", "1"}, {"b", "2"}} with `separator` between name and value.
absl::StatusOr<std::vector<std::pair<std::string, std::string>>> ParsePairs(const std::string& text,
                                                                            char separator,
                                                                            const char* flag) {
  std::vector<std::pair<std::string, std::string>> pairs;
  for (absl::string_view item : absl::StrSplit(text, ',', absl::SkipWhitespace())) {
    std::vector<std::string> parts = absl::StrSplit(item, absl::MaxSplits(separator, 1));
    if (parts.size() != 2 || parts[0].empty() || parts[1].empty()) {
      return absl::InvalidArgumentError(absl::StrCat("--", flag, ": '", item, "' is not name",
                                                     std::string(1, separator), "value"));
    }
    pairs.emplace_back(parts[0], parts[1]);
  }
  return pairs;
}

absl::Status Run() {
  std::string model_dir = absl::GetFlag(FLAGS_model_dir);
  std::string experts_flag = absl::GetFlag(FLAGS_experts);
  std::string router_dir = absl::GetFlag(FLAGS_router);
  if (model_dir.empty()) {
    const std::string demo_dir = absl::GetFlag(FLAGS_default_model_dir);
    RETURN_IF_ERROR(moelora::WriteDemoAssets(demo_dir));
    model_dir = demo_dir + "/model";
    if (experts_flag.empty()) {
      std::vector<std::string> pairs;
      for (const std::string& name : moelora::DemoExpertNames()) {
        pairs.push_back(absl::StrCat(name, "=", demo_dir, "/experts/", name));
      }
      experts_flag = absl::StrJoin(pairs, ",");
    }
    if (router_dir.empty()) router_dir = demo_dir + "/routers/demo-router";
  }
  ASSIGN_OR_RETURN(auto prompts, ParsePrompts(absl::GetFlag(FLAGS_prompt)));
  ASSIGN_OR_RETURN(
      moelora::LoadOptions options,
      moelora::ParseLoadOptions(absl::GetFlag(FLAGS_device), absl::GetFlag(FLAGS_dtype)));
  const moelora::ExpertPoolOptions pool_options = {.capacity = absl::GetFlag(FLAGS_pool_capacity),
                                                   .max_rank = absl::GetFlag(FLAGS_pool_max_rank)};
  options.adapter_room = {pool_options.capacity, pool_options.max_rank};
  ASSIGN_OR_RETURN(auto model, moelora::Model::Load(model_dir, options));
  const moelora::ModelConfig& config = model->config();
  std::cout << "model " << model_dir << ": " << moelora::ModelTypeName(config.model_type) << ", "
            << config.num_hidden_layers << " layers, hidden " << config.hidden_size << ", vocab "
            << config.vocab_size << ", " << model->parameter_bytes() << " bytes on "
            << options.device << "\n";

  ASSIGN_OR_RETURN(auto pool, moelora::ExpertPool::Create(*model, pool_options));
  moelora::Mixture mixture(*model, *pool);
  ASSIGN_OR_RETURN(auto experts, ParsePairs(experts_flag, '=', "experts"));
  for (const auto& [name, dir] : experts) {
    ASSIGN_OR_RETURN(moelora::ExpertInfo info, mixture.AttachExpert(name, dir));
    std::cout << "expert " << info.name << ": slot " << info.slot << ", rank " << info.max_rank
              << ", " << info.num_modules << " modules, " << info.device_bytes << " bytes\n";
  }
  if (!router_dir.empty()) {
    ASSIGN_OR_RETURN(moelora::RouterInfo info, mixture.AttachRouter(router_dir, /*force=*/false));
    std::cout << "router " << info.name << " over [" << absl::StrJoin(info.config.experts, ",")
              << "]" << (info.is_default ? " (default)" : "") << "\n";
  }
  moelora::RoutingControls controls;
  controls.pinned_expert = absl::GetFlag(FLAGS_pin);
  ASSIGN_OR_RETURN(auto weights, ParsePairs(absl::GetFlag(FLAGS_weights), ':', "weights"));
  for (const auto& [name, value] : weights) {
    double weight = 0;
    if (!absl::SimpleAtod(value, &weight)) {
      return absl::InvalidArgumentError(absl::StrCat("--weights: '", value, "' is not a number"));
    }
    controls.explicit_weights[name] = weight;
  }

  const int64_t max_new_tokens = absl::GetFlag(FLAGS_max_new_tokens);
  const auto start = std::chrono::steady_clock::now();
  ASSIGN_OR_RETURN(moelora::MixtureGeneration outputs,
                   moelora::GreedyGenerate(mixture, prompts, max_new_tokens, controls));
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  for (size_t i = 0; i < prompts.size(); ++i) {
    std::cout << "prompt [" << absl::StrJoin(prompts[i], ",") << "] -> greedy ["
              << absl::StrJoin(outputs.tokens[i], ",") << "]\n";
    if (absl::GetFlag(FLAGS_show_routing) && outputs.routing[i].defined() &&
        !outputs.experts.empty()) {
      const at::Tensor routing = outputs.routing[i].to(at::kCPU, at::kFloat).contiguous();
      for (int64_t t = 0; t < routing.size(0); ++t) {
        std::string line = absl::StrFormat("  token %5d:", outputs.tokens[i][t]);
        for (size_t e = 0; e < outputs.experts.size(); ++e) {
          absl::StrAppendFormat(&line, " %s=%.3f", outputs.experts[e], routing[t][e].item<float>());
        }
        std::cout << line << "\n";
      }
    }
  }
  std::cout << "generated " << prompts.size() * max_new_tokens << " tokens in " << seconds
            << " s, all experts applied in one pass per step\n";
  return absl::OkStatus();
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("Greedy generation on a HF checkpoint through moelora's core.");
  absl::ParseCommandLine(argc, argv);
  const absl::Status status = Run();
  if (!status.ok()) {
    std::cerr << "moelora-generate: " << status << "\n";
    return 1;
  }
  return 0;
}
