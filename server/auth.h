#ifndef MOELORA_SERVER_AUTH_H_
#define MOELORA_SERVER_AUTH_H_

// Admin authentication (a bearer token read from a file) and the transport credentials of the
// server's ports (TLS, optionally mutual, or insecure).
//
// The token is checked in one of two places, with the same constant-time comparison:
//   - on a TLS admin port of its own, by BearerTokenAuthProcessor (gRPC runs it before any
//     handler, for every call on that port);
//   - otherwise (an insecure port, where gRPC cannot attach a processor, or Admin shared with the
//     data port, where the processor would guard Inference too) by the Admin service, per call.

#include <grpcpp/security/auth_metadata_processor.h>
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/support/string_ref.h>

#include <map>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace moelora::server {

// The token in `path`, surrounding whitespace removed. NotFound when the file is missing,
// InvalidArgument when it holds no token or whitespace inside it.
absl::StatusOr<std::string> ReadTokenFile(const std::string& path);

// Checks "authorization: Bearer <token>" metadata against the configured token.
class BearerTokenChecker {
 public:
  explicit BearerTokenChecker(std::string token) : token_(std::move(token)) {}

  // OK when `authorization` is exactly "Bearer <token>" (the scheme case-insensitive);
  // Unauthenticated otherwise. The token comparison takes time independent of where it differs.
  absl::Status Check(absl::string_view authorization) const;
  // The same on a call's metadata: Unauthenticated when "authorization" is missing or repeated.
  absl::Status CheckMetadata(
      const std::multimap<grpc::string_ref, grpc::string_ref>& metadata) const;

 private:
  std::string token_;
};

// For secure (TLS) ports: refuses every call without the token with UNAUTHENTICATED.
class BearerTokenAuthProcessor : public grpc::AuthMetadataProcessor {
 public:
  explicit BearerTokenAuthProcessor(std::shared_ptr<const BearerTokenChecker> checker)
      : checker_(std::move(checker)) {}

  // A string comparison: run inline on the transport thread.
  bool IsBlocking() const override { return false; }
  grpc::Status Process(const InputMetadata& auth_metadata, grpc::AuthContext* context,
                       OutputMetadata* consumed_auth_metadata,
                       OutputMetadata* response_metadata) override;

 private:
  std::shared_ptr<const BearerTokenChecker> checker_;
};

struct TlsOptions {
  std::string cert_file;  // PEM server certificate chain; with key_file enables TLS
  std::string key_file;   // PEM private key
  // PEM CA bundle: require client certificates and verify them against it (mutual TLS).
  std::string client_ca_file;

  bool enabled() const { return !cert_file.empty(); }
};

// TLS credentials from the PEM files (InvalidArgument when only one of cert/key is given or
// client_ca_file is given without them, NotFound for a missing file), or insecure credentials
// when TLS is not configured.
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(
    const TlsOptions& options);

}  // namespace moelora::server

#endif  // MOELORA_SERVER_AUTH_H_
