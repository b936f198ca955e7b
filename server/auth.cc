#include "server/auth.h"

#include <grpcpp/security/server_credentials.h>

#include <cstddef>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "core/file_io.h"
#include "core/status_macros.h"
#include "server/status_mapping.h"

namespace moelora::server {
namespace {

constexpr absl::string_view kScheme = "bearer ";

// Equal strings, in time that depends only on `expected`'s length.
bool ConstantTimeEquals(absl::string_view given, absl::string_view expected) {
  unsigned char diff = given.size() == expected.size() ? 0 : 1;
  for (size_t i = 0; i < expected.size(); ++i) {
    const unsigned char g = i < given.size() ? static_cast<unsigned char>(given[i]) : 0;
    diff |= g ^ static_cast<unsigned char>(expected[i]);
  }
  return diff == 0;
}

}  // namespace

absl::StatusOr<std::string> ReadTokenFile(const std::string& path) {
  ASSIGN_OR_RETURN(std::string text, ReadFileToString(path, "admin token file"));
  const std::string token(absl::StripAsciiWhitespace(text));
  if (token.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": admin token file is empty"));
  }
  for (char c : token) {
    if (absl::ascii_isspace(static_cast<unsigned char>(c)) ||
        !absl::ascii_isprint(static_cast<unsigned char>(c))) {
      return absl::InvalidArgumentError(absl::StrCat(
          path, ": the admin token must be one line of printable characters without spaces"));
    }
  }
  return token;
}

absl::Status BearerTokenChecker::Check(absl::string_view authorization) const {
  if (authorization.size() < kScheme.size() ||
      !absl::EqualsIgnoreCase(authorization.substr(0, kScheme.size()), kScheme)) {
    return absl::UnauthenticatedError(
        "admin calls need the metadata 'authorization: Bearer <token>'");
  }
  if (!ConstantTimeEquals(authorization.substr(kScheme.size()), token_)) {
    return absl::UnauthenticatedError("admin token not accepted");
  }
  return absl::OkStatus();
}

absl::Status BearerTokenChecker::CheckMetadata(
    const std::multimap<grpc::string_ref, grpc::string_ref>& metadata) const {
  auto [begin, end] = metadata.equal_range("authorization");
  if (begin == end) {
    return absl::UnauthenticatedError(
        "admin calls need the metadata 'authorization: Bearer <token>'");
  }
  if (std::next(begin) != end) {
    return absl::UnauthenticatedError("more than one 'authorization' metadata entry");
  }
  return Check(absl::string_view(begin->second.data(), begin->second.size()));
}

grpc::Status BearerTokenAuthProcessor::Process(const InputMetadata& auth_metadata,
                                               grpc::AuthContext* context,
                                               OutputMetadata* consumed_auth_metadata,
                                               OutputMetadata* response_metadata) {
  const absl::Status status = checker_->CheckMetadata(auth_metadata);
  if (!status.ok()) return ToGrpcStatus(status);
  // The token stays out of what handlers see.
  const auto it = auth_metadata.find("authorization");
  consumed_auth_metadata->insert(
      {"authorization", std::string(it->second.data(), it->second.size())});
  return grpc::Status::OK;
}

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(
    const TlsOptions& options) {
  if (options.cert_file.empty() != options.key_file.empty()) {
    return absl::InvalidArgumentError("--tls_cert_file and --tls_key_file go together");
  }
  if (!options.enabled()) {
    if (!options.client_ca_file.empty()) {
      return absl::InvalidArgumentError(
          "--tls_client_ca_file needs --tls_cert_file and --tls_key_file (mutual TLS)");
    }
    return grpc::InsecureServerCredentials();
  }
  grpc::SslServerCredentialsOptions ssl;
  ASSIGN_OR_RETURN(std::string cert, ReadFileToString(options.cert_file, "TLS certificate"));
  ASSIGN_OR_RETURN(std::string key, ReadFileToString(options.key_file, "TLS private key"));
  ssl.pem_key_cert_pairs.push_back({std::move(key), std::move(cert)});
  if (!options.client_ca_file.empty()) {
    ASSIGN_OR_RETURN(ssl.pem_root_certs,
                     ReadFileToString(options.client_ca_file, "TLS client CA bundle"));
    ssl.client_certificate_request = GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY;
  }
  return grpc::SslServerCredentials(ssl);
}

}  // namespace moelora::server
