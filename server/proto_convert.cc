#include "server/proto_convert.h"

#include <cstdint>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"

namespace moelora::server {

RoutingControls FromProto(const v1::RoutingControls& routing) {
  RoutingControls controls;
  controls.router = routing.router();
  for (const auto& [name, weight] : routing.expert_weights()) {
    controls.explicit_weights[name] = weight;
  }
  controls.pinned_expert = routing.pinned_expert();
  controls.masked_experts.assign(routing.masked_experts().begin(), routing.masked_experts().end());
  if (routing.has_top_k()) controls.top_k = static_cast<int64_t>(routing.top_k());
  if (routing.has_temperature()) controls.temperature = routing.temperature();
  return controls;
}

void ToProto(const ExpertStatus& expert, v1::ExpertInfo* out) {
  out->set_name(expert.info.name);
  out->set_source(expert.info.source);
  out->set_slot(static_cast<int32_t>(expert.info.slot));
  out->set_rank(static_cast<int32_t>(expert.info.max_rank));
  out->set_num_modules(static_cast<int32_t>(expert.info.num_modules));
  for (const std::string& module : expert.target_modules) out->add_target_modules(module);
  out->set_device_bytes(expert.info.device_bytes);
  out->set_reserved_bytes(expert.info.reserved_bytes);
  if (expert.attach_time != absl::Time() && expert.attach_time != absl::InfinitePast() &&
      expert.attach_time != absl::InfiniteFuture()) {
    // ToUnixSeconds floors, so nanos is in [0, 1e9) as Timestamp wants.
    const int64_t seconds = absl::ToUnixSeconds(expert.attach_time);
    out->mutable_attach_time()->set_seconds(seconds);
    out->mutable_attach_time()->set_nanos(static_cast<int32_t>(
        absl::ToInt64Nanoseconds(expert.attach_time - absl::FromUnixSeconds(seconds))));
  }
  out->set_requests_served(expert.requests_served);
}

void ToProto(const RouterInfo& router, v1::RouterInfo* out) {
  out->set_name(router.name);
  for (const std::string& expert : router.config.experts) out->add_experts(expert);
  out->set_input(router.config.input == RouterInput::kEmbeddings ? "embeddings" : "base_hidden");
  out->set_granularity(router.config.granularity == RoutingGranularity::kToken ? "token"
                                                                               : "sequence");
  out->set_top_k(static_cast<uint32_t>(router.config.top_k));
  out->set_temperature(router.config.temperature);
  out->set_is_default(router.is_default);
  for (const std::string& expert : router.missing_experts) out->add_missing_experts(expert);
}

std::string RoutingLabel(const RoutingControls& routing) {
  if (!routing.pinned_expert.empty()) return absl::StrCat("pinned:", routing.pinned_expert);
  if (!routing.explicit_weights.empty()) return "weights";
  if (!routing.router.empty()) return routing.router;
  return "default";
}

}  // namespace moelora::server
