#ifndef MOELORA_SERVER_PROTO_CONVERT_H_
#define MOELORA_SERVER_PROTO_CONVERT_H_

// Conversions between the moelora.v1 messages and core's types, shared by both services.

#include <string>

#include "absl/status/statusor.h"
#include "core/engine.h"
#include "core/mixture.h"
#include "moelora/v1/common.pb.h"

namespace moelora::server {

// The request's routing controls as core takes them; core checks the values (names, weights
// finite and >= 0, top_k against the router).
RoutingControls FromProto(const v1::RoutingControls& routing);

void ToProto(const ExpertStatus& expert, v1::ExpertInfo* out);
void ToProto(const RouterInfo& router, v1::RouterInfo* out);

// The name a request is logged with: "pinned:<expert>", "weights", the router it names, or
// "default" (the default router, or the base model when there is none).
std::string RoutingLabel(const RoutingControls& routing);

}  // namespace moelora::server

#endif  // MOELORA_SERVER_PROTO_CONVERT_H_
