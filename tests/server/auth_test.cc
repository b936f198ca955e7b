#include "server/auth.h"

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <fstream>
#include <map>
#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "core/file_io.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "tests/testing/temp_dir.h"

namespace moelora::server {
namespace {

using ::grpc::health::v1::Health;
using ::grpc::health::v1::HealthCheckRequest;
using ::grpc::health::v1::HealthCheckResponse;

void WriteFile(const std::string& path, const std::string& text) { std::ofstream(path) << text; }

TEST(ReadTokenFileTest, TrimsAndRefusesEmptyOrMissing) {
  testing_support::ScopedTempDir temp("auth_test");
  WriteFile(temp.Join("token"), "  s3cret-token\n");
  auto token = ReadTokenFile(temp.Join("token"));
  ASSERT_TRUE(token.ok()) << token.status();
  EXPECT_EQ(*token, "s3cret-token");

  WriteFile(temp.Join("empty"), " \n");
  EXPECT_EQ(ReadTokenFile(temp.Join("empty")).status().code(), absl::StatusCode::kInvalidArgument);
  WriteFile(temp.Join("spaces"), "two words\n");
  EXPECT_EQ(ReadTokenFile(temp.Join("spaces")).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ReadTokenFile(temp.Join("missing")).status().code(), absl::StatusCode::kNotFound);
}

TEST(BearerTokenCheckerTest, AcceptsOnlyTheExactToken) {
  const BearerTokenChecker checker("abc123");
  EXPECT_TRUE(checker.Check("Bearer abc123").ok());
  EXPECT_TRUE(checker.Check("bearer abc123").ok());
  for (const char* bad : {"", "abc123", "Bearer", "Bearer ", "Bearer abc12", "Bearer abc1234",
                          "Bearer abc124", "Basic abc123", "Bearer  abc123"}) {
    EXPECT_EQ(checker.Check(bad).code(), absl::StatusCode::kUnauthenticated) << bad;
  }
}

TEST(BearerTokenCheckerTest, Metadata) {
  const BearerTokenChecker checker("abc123");
  const std::string key = "authorization", good = "Bearer abc123", other = "x-other";
  std::multimap<grpc::string_ref, grpc::string_ref> metadata;
  EXPECT_EQ(checker.CheckMetadata(metadata).code(), absl::StatusCode::kUnauthenticated);
  metadata.insert({other, good});
  EXPECT_EQ(checker.CheckMetadata(metadata).code(), absl::StatusCode::kUnauthenticated);
  metadata.insert({key, good});
  EXPECT_TRUE(checker.CheckMetadata(metadata).ok());
  metadata.insert({key, good});  // repeated: refused
  EXPECT_EQ(checker.CheckMetadata(metadata).code(), absl::StatusCode::kUnauthenticated);
}

TEST(BearerTokenAuthProcessorTest, ConsumesTheTokenOrRefuses) {
  BearerTokenAuthProcessor processor(std::make_shared<BearerTokenChecker>("abc123"));
  EXPECT_FALSE(processor.IsBlocking());
  const std::string key = "authorization", good = "Bearer abc123", bad = "Bearer nope";
  grpc::AuthMetadataProcessor::InputMetadata input;
  grpc::AuthMetadataProcessor::OutputMetadata consumed, response;
  input.insert({key, bad});
  EXPECT_EQ(processor.Process(input, nullptr, &consumed, &response).error_code(),
            grpc::StatusCode::UNAUTHENTICATED);
  input.clear();
  input.insert({key, good});
  EXPECT_TRUE(processor.Process(input, nullptr, &consumed, &response).ok());
  EXPECT_EQ(consumed.count("authorization"), 1u);
}

TEST(MakeServerCredentialsTest, ChecksTheFileCombination) {
  EXPECT_TRUE(MakeServerCredentials({}).ok());
  EXPECT_EQ(MakeServerCredentials({.cert_file = "c.pem"}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(MakeServerCredentials({.client_ca_file = "ca.pem"}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(MakeServerCredentials({.cert_file = "/nonexistent/c.pem", .key_file = "/nonexistent/k"})
                .status()
                .code(),
            absl::StatusCode::kNotFound);
}

// A TLS server (health service only) whose port checks the token with the processor, as the
// admin port does with --tls_cert_file and --admin_token_file.
class TlsAuthTest : public testing::Test {
 protected:
  void SetUp() override {
    const std::string command = absl::StrCat(
        "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 "
        "-subj /CN=localhost -addext subjectAltName=DNS:localhost -keyout ",
        temp_.Join("key.pem"), " -out ", temp_.Join("cert.pem"), " 2>/dev/null");
    if (std::system(command.c_str()) != 0) GTEST_SKIP() << "no openssl to make a certificate";
    cert_ = *ReadFileToString(temp_.Join("cert.pem"), "cert");
    key_ = *ReadFileToString(temp_.Join("key.pem"), "key");
  }

  void Start(const TlsOptions& tls) {
    auto credentials = MakeServerCredentials(tls);
    ASSERT_TRUE(credentials.ok()) << credentials.status();
    (*credentials)
        ->SetAuthMetadataProcessor(std::make_shared<BearerTokenAuthProcessor>(
            std::make_shared<BearerTokenChecker>("abc123")));
    grpc::EnableDefaultHealthCheckService(true);
    grpc::ServerBuilder builder;
    builder.AddListeningPort("127.0.0.1:0", *credentials, &port_);
    server_ = builder.BuildAndStart();
    ASSERT_NE(server_, nullptr);
  }

  grpc::Status Check(const grpc::SslCredentialsOptions& client, const std::string& token) {
    grpc::ChannelArguments args;
    auto channel = grpc::CreateCustomChannel(absl::StrCat("localhost:", port_),
                                             grpc::SslCredentials(client), args);
    auto stub = Health::NewStub(channel);
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    if (!token.empty()) context.AddMetadata("authorization", "Bearer " + token);
    HealthCheckRequest request;
    HealthCheckResponse response;
    return stub->Check(&context, request, &response);
  }

  void TearDown() override {
    if (server_ != nullptr) server_->Shutdown();
  }

  testing_support::ScopedTempDir temp_{"tls_test"};
  std::string cert_, key_;
  int port_ = 0;
  std::unique_ptr<grpc::Server> server_;
};

TEST_F(TlsAuthTest, TokenCheckedByTheProcessor) {
  Start({.cert_file = temp_.Join("cert.pem"), .key_file = temp_.Join("key.pem")});
  const grpc::SslCredentialsOptions client{.pem_root_certs = cert_};
  EXPECT_TRUE(Check(client, "abc123").ok());
  const grpc::Status wrong = Check(client, "wrong");
  EXPECT_EQ(wrong.error_code(), grpc::StatusCode::UNAUTHENTICATED) << wrong.error_message();
  EXPECT_EQ(Check(client, "").error_code(), grpc::StatusCode::UNAUTHENTICATED);
}

TEST_F(TlsAuthTest, MutualTlsRequiresAClientCertificate) {
  Start({.cert_file = temp_.Join("cert.pem"),
         .key_file = temp_.Join("key.pem"),
         .client_ca_file = temp_.Join("cert.pem")});
  // The self-signed certificate is its own CA: the client presents it too.
  EXPECT_TRUE(
      Check({.pem_root_certs = cert_, .pem_private_key = key_, .pem_cert_chain = cert_}, "abc123")
          .ok());
  EXPECT_EQ(Check({.pem_root_certs = cert_}, "abc123").error_code(), grpc::StatusCode::UNAVAILABLE);
}

}  // namespace
}  // namespace moelora::server
