#ifndef MOELORA_CORE_DEMO_ASSETS_H_
#define MOELORA_CORE_DEMO_ASSETS_H_

// The built-in default that `make demo` serves: a tiny llama, four LoRA experts of different
// ranks and targets, a token-level router over them, and the server's start-up manifest, all
// made on first run so nothing has to be downloaded.
//
// The experts and the router are TRAINED (core/trainer.h), in a few seconds on one CPU core: each
// expert learns one synthetic "domain" (DemoDomains(): a range of token ids with its own
// deterministic next-token rule) in the trainer's expert mode, and the router is then trained from
// scratch over the four of them, so a prompt from one domain is routed to that domain's expert.
// Training is seeded and single-threaded: the same libtorch build writes the same bytes.
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
#include "core/training_data.h"

namespace moelora {

// Names of the experts the manifest attaches, in router order.
std::vector<std::string> DemoExpertNames();

// The synthetic domain each demo expert was trained on, in DemoExpertNames() order: math = token
// ids 8..27, code = 38..57, chat = 68..87, poetry = 98..117 (other ids belong to none). Within a
// domain each token is followed by one fixed token (a cycle through the domain's 20 ids).
std::vector<SyntheticDomain> DemoDomains();

// Writes everything above unless <dir>/manifest.json already exists (then does nothing).
absl::Status WriteDemoAssets(const std::string& dir);

}  // namespace moelora

#endif  // MOELORA_CORE_DEMO_ASSETS_H_
