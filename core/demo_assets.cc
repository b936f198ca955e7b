#include "core/demo_assets.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <fstream>

#include "absl/strings/str_cat.h"
#include "core/file_io.h"
#include "core/model.h"
#include "core/random_model.h"
#include "core/router.h"
#include "core/status_macros.h"
#include "core/trainer.h"
#include "nlohmann/json.hpp"

namespace moelora {
namespace {

// Training sequences per domain and their length.
constexpr int64_t kSequencesPerDomain = 64;
constexpr int64_t kSequenceLength = 16;

// The tiny model's ops are far too small to share among threads (two OpenMP threads on a busy
// 2-core machine make a step several times slower than one): train on one, then restore.
class SingleThreaded {
 public:
  SingleThreaded() : saved_(at::get_num_threads()) { at::set_num_threads(1); }
  ~SingleThreaded() { at::set_num_threads(saved_); }
  SingleThreaded(const SingleThreaded&) = delete;
  SingleThreaded& operator=(const SingleThreaded&) = delete;

 private:
  int saved_;
};

TrainerOptions DemoTrainerOptions(uint64_t seed, const std::string& out_dir) {
  TrainerOptions options;
  options.batch_size = 8;
  options.seed = seed;
  options.out_dir = out_dir;
  options.log_every = 0;
  return options;
}

}  // namespace

std::vector<std::string> DemoExpertNames() { return {"math", "code", "chat", "poetry"}; }

std::vector<SyntheticDomain> DemoDomains() {
  const std::vector<std::string> names = DemoExpertNames();
  std::vector<SyntheticDomain> domains;
  for (size_t i = 0; i < names.size(); ++i) {
    domains.push_back({.name = names[i],
                       .first_token = 8 + 30 * static_cast<int64_t>(i),
                       .num_tokens = 20,
                       .rule_seed = 21 + i});
  }
  return domains;
}

absl::Status WriteDemoAssets(const std::string& dir) {
  const std::string manifest_path = dir + "/manifest.json";
  if (IsRegularFile(manifest_path)) return absl::OkStatus();
  SingleThreaded single_threaded;

  const ModelConfig config = TinyModelConfig(ModelType::kLlama);
  RETURN_IF_ERROR(WriteRandomModel(dir + "/model", config, {.seed = 7}));
  ASSIGN_OR_RETURN(std::unique_ptr<Model> model, Model::Load(dir + "/model"));

  // Different ranks and targets, so the pool really holds a mixed set.
  const std::vector<std::string> all = {"q_proj",    "k_proj",  "v_proj",   "o_proj",
                                        "gate_proj", "up_proj", "down_proj"};
  const NewExpertOptions specs[] = {
      {.r = 4, .lora_alpha = 8, .target_modules = {"q_proj", "k_proj", "v_proj", "o_proj"}},
      {.r = 8, .lora_alpha = 16, .target_modules = all},
      {.r = 2, .lora_alpha = 4, .target_modules = {"gate_proj", "up_proj", "down_proj"}},
      {.r = 6, .lora_alpha = 6, .use_rslora = true, .target_modules = {"q_proj", "o_proj"}},
  };
  const std::vector<SyntheticDomain> domains = DemoDomains();
  nlohmann::json manifest;
  manifest["experts"] = nlohmann::json::array();
  std::vector<ExpertSource> experts;
  std::vector<TokenSequence> mixed;
  for (size_t i = 0; i < domains.size(); ++i) {
    const SyntheticDomain& domain = domains[i];
    const std::string path = absl::StrCat("experts/", domain.name);
    // Expert mode: a PEFT-initialised LoRA trained alone on its domain.
    NewExpertOptions spec = specs[i];
    spec.name = domain.name;
    TrainerOptions options = DemoTrainerOptions(11 + i, absl::StrCat(dir, "/", path));
    options.steps = 120;
    options.expert_lr = 1e-2;
    ASSIGN_OR_RETURN(auto trainer, Trainer::ForNewExpert(*model, spec, options));
    const std::vector<TokenSequence> sequences =
        DomainSequences(domain, kSequencesPerDomain, kSequenceLength, 100 + i);
    RETURN_IF_ERROR(trainer->Train({sequences, {}}).status());
    mixed.insert(mixed.end(), sequences.begin(), sequences.end());
    experts.push_back({domain.name, options.out_dir});
    // Paths relative to the manifest, so the folder can move (or be mounted elsewhere).
    manifest["experts"].push_back({{"name", domain.name}, {"path", path}});
  }
  RETURN_IF_ERROR(WriteRandomAdapter(dir + "/experts/extra", config,
                                     {.r = 4, .lora_alpha = 8, .seed = 15, .std = 0.3}));

  // The router, trained from scratch over the four frozen experts on all domains at once.
  TrainerOptions options = DemoTrainerOptions(16, dir + "/routers/demo-router");
  options.steps = 150;
  options.lr = 5e-2;
  options.router_name = "demo-router";
  ASSIGN_OR_RETURN(auto router_trainer, Trainer::ForRouter(*model, experts, options));
  RETURN_IF_ERROR(router_trainer->Train({mixed, {}}).status());
  manifest["routers"] = {{{"path", "routers/demo-router"}, {"default", true}}};

  // Last: its presence marks a complete set.
  std::ofstream out(manifest_path);
  out << manifest.dump(2) << "\n";
  if (!out.good()) return absl::InternalError(absl::StrCat("cannot write ", manifest_path));
  return absl::OkStatus();
}

}  // namespace moelora
