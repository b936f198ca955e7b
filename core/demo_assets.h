#ifndef MOELORA_CORE_DEMO_ASSETS_H_
#define MOELORA_CORE_DEMO_ASSETS_H_

// The built-in default that `make demo` serves: a tiny llama, four LoRA experts of different
// ranks and targets, a token-level router over them, and the server's start-up manifest, all
// written deterministically (same bytes on every machine) so nothing has to be downloaded.
//
//   <dir>/model/                       config.json + model.safetensors
//   <dir>/experts/{math,code,chat,poetry}/  PEFT adapters
//   <dir>/experts/extra/               one more adapter, not in the manifest (for live attach)
//   <dir>/routers/demo-router/         router_config.json + router.safetensors
//   <dir>/manifest.json                {"experts": [...], "routers": [...]} for moelora-server,
//                                      paths relative to <dir>

#include <string>
#include <vector>

#include "absl/status/status.h"

namespace moelora {

// Names of the experts the manifest attaches, in router order.
std::vector<std::string> DemoExpertNames();

// Writes everything above unless <dir>/manifest.json already exists (then does nothing).
absl::Status WriteDemoAssets(const std::string& dir);

}  // namespace moelora

#endif  // MOELORA_CORE_DEMO_ASSETS_H_
