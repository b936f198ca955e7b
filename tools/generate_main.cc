// Greedy generation on a Hugging Face checkpoint, straight through core. With no --model_dir it
// uses a built-in tiny llama, written deterministically on first use.
//
//   moelora-generate --prompt=1,5,9,2 --max_new_tokens=16
//   moelora-generate --model_dir=/models/llama --device=cuda --dtype=bf16 --prompt=...

#include <c10/core/Device.h>
#include <c10/util/Exception.h>

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <iostream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "core/generation.h"
#include "core/model.h"
#include "core/random_model.h"
#include "core/status_macros.h"

ABSL_FLAG(std::string, model_dir, "",
          "HF checkpoint directory (config.json + safetensors); empty = the built-in tiny model");
ABSL_FLAG(std::string, default_model_dir, "build/default-model",
          "where the built-in tiny model is written on first use");
ABSL_FLAG(std::string, prompt, "1,17,42,99,7",
          "comma-separated prompt token ids; ';' separates "
          "prompts of a batch");
ABSL_FLAG(int64_t, max_new_tokens, 16, "tokens to generate per prompt");
ABSL_FLAG(std::string, device, "cpu", "cpu, cuda or cuda:N");
ABSL_FLAG(std::string, dtype, "fp32", "fp32, bf16 or fp16");

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

absl::StatusOr<moelora::LoadOptions> ParseLoadOptions() {
  moelora::LoadOptions options;
  try {
    options.device = c10::Device(absl::GetFlag(FLAGS_device));
  } catch (const c10::Error& e) {
    return absl::InvalidArgumentError(
        absl::StrCat("--device: '", absl::GetFlag(FLAGS_device), "' is not a device"));
  }
  const std::string dtype = absl::GetFlag(FLAGS_dtype);
  if (dtype == "fp32") {
    options.dtype = at::kFloat;
  } else if (dtype == "bf16") {
    options.dtype = at::kBFloat16;
  } else if (dtype == "fp16") {
    options.dtype = at::kHalf;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("--dtype: '", dtype, "', expected fp32, bf16 or fp16"));
  }
  return options;
}

absl::Status Run() {
  std::string model_dir = absl::GetFlag(FLAGS_model_dir);
  if (model_dir.empty()) {
    model_dir = absl::GetFlag(FLAGS_default_model_dir);
    if (!std::filesystem::exists(model_dir + "/config.json")) {
      std::cout << "writing the built-in tiny llama to " << model_dir << "\n";
      RETURN_IF_ERROR(moelora::WriteRandomModel(
          model_dir, moelora::TinyModelConfig(moelora::ModelType::kLlama), {.seed = 7}));
    }
  }
  ASSIGN_OR_RETURN(auto prompts, ParsePrompts(absl::GetFlag(FLAGS_prompt)));
  ASSIGN_OR_RETURN(moelora::LoadOptions options, ParseLoadOptions());
  ASSIGN_OR_RETURN(auto model, moelora::Model::Load(model_dir, options));
  const moelora::ModelConfig& config = model->config();
  std::cout << "model " << model_dir << ": " << moelora::ModelTypeName(config.model_type) << ", "
            << config.num_hidden_layers << " layers, hidden " << config.hidden_size << ", vocab "
            << config.vocab_size << ", " << model->parameter_bytes() << " bytes on "
            << options.device << "\n";

  const auto start = std::chrono::steady_clock::now();
  ASSIGN_OR_RETURN(auto outputs,
                   moelora::GreedyGenerate(*model, prompts, absl::GetFlag(FLAGS_max_new_tokens)));
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  for (size_t i = 0; i < prompts.size(); ++i) {
    std::cout << "prompt [" << absl::StrJoin(prompts[i], ",") << "] -> greedy ["
              << absl::StrJoin(outputs[i], ",") << "]\n";
  }
  std::cout << "generated " << prompts.size() * absl::GetFlag(FLAGS_max_new_tokens) << " tokens in "
            << seconds << " s\n";
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
