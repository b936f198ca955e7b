#include "core/demo_assets.h"

#include <ATen/ATen.h>
#include <sys/stat.h>

#include <fstream>

#include "absl/strings/str_cat.h"
#include "core/random_model.h"
#include "core/router.h"
#include "core/status_macros.h"
#include "nlohmann/json.hpp"

namespace moelora {

std::vector<std::string> DemoExpertNames() { return {"math", "code", "chat", "poetry"}; }

absl::Status WriteDemoAssets(const std::string& dir) {
  const std::string manifest_path = dir + "/manifest.json";
  struct stat info;
  if (stat(manifest_path.c_str(), &info) == 0) return absl::OkStatus();

  const ModelConfig config = TinyModelConfig(ModelType::kLlama);
  RETURN_IF_ERROR(WriteRandomModel(dir + "/model", config, {.seed = 7}));
  const std::vector<std::string> all = {"q_proj",    "k_proj",  "v_proj",   "o_proj",
                                        "gate_proj", "up_proj", "down_proj"};
  // Different ranks and targets, so the pool really holds a mixed set.
  const RandomAdapterOptions specs[] = {
      {.r = 4, .lora_alpha = 8, .seed = 11, .std = 0.3},
      {.r = 8, .lora_alpha = 16, .target_modules = all, .seed = 12, .std = 0.3},
      {.r = 2,
       .lora_alpha = 4,
       .target_modules = {"gate_proj", "up_proj", "down_proj"},
       .seed = 13,
       .std = 0.3},
      {.r = 6,
       .lora_alpha = 6,
       .use_rslora = true,
       .target_modules = {"q_proj", "o_proj"},
       .seed = 14,
       .std = 0.3},
  };
  const std::vector<std::string> names = DemoExpertNames();
  nlohmann::json manifest;
  manifest["experts"] = nlohmann::json::array();
  for (size_t i = 0; i < names.size(); ++i) {
    const std::string path = absl::StrCat("experts/", names[i]);
    RETURN_IF_ERROR(WriteRandomAdapter(absl::StrCat(dir, "/", path), config, specs[i]));
    // Paths relative to the manifest, so the folder can move (or be mounted elsewhere).
    manifest["experts"].push_back({{"name", names[i]}, {"path", path}});
  }
  RETURN_IF_ERROR(WriteRandomAdapter(dir + "/experts/extra", config,
                                     {.r = 4, .lora_alpha = 8, .seed = 15, .std = 0.3}));

  RouterConfig router_config;
  router_config.name = "demo-router";
  router_config.experts = names;
  at::manual_seed(16);
  const int64_t k = static_cast<int64_t>(names.size());
  ASSIGN_OR_RETURN(auto router, Router::Create(router_config, at::randn({k, config.hidden_size}),
                                               at::zeros({k})));
  RETURN_IF_ERROR(router->Save(dir + "/routers/demo-router"));
  manifest["routers"] = {{{"path", "routers/demo-router"}, {"default", true}}};

  // Last: its presence marks a complete set.
  std::ofstream out(manifest_path);
  out << manifest.dump(2) << "\n";
  if (!out.good()) return absl::InternalError(absl::StrCat("cannot write ", manifest_path));
  return absl::OkStatus();
}

}  // namespace moelora
