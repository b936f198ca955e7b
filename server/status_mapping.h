#ifndef MOELORA_SERVER_STATUS_MAPPING_H_
#define MOELORA_SERVER_STATUS_MAPPING_H_

// The one place where absl::Status codes become gRPC status codes (the server edge).

#include <grpcpp/support/status.h>

#include "absl/status/status.h"

namespace moelora::server {

// Every absl code maps to the gRPC code of the same name (the numbering is shared); the message
// is kept. OK maps to grpc::Status::OK.
grpc::Status ToGrpcStatus(const absl::Status& status);

}  // namespace moelora::server

#endif  // MOELORA_SERVER_STATUS_MAPPING_H_
