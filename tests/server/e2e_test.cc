// The real moelora-server binary as a child process: SIGTERM while a request streams lets the
// request finish, then the process exits 0.

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <signal.h>

#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/random_model.h"
#include "moelora/v1/inference.grpc.pb.h"
#include "tests/testing/server_process.h"
#include "tests/testing/temp_dir.h"

namespace moelora::server {
namespace {

using testing_support::ReadFile;

class ServerProcessTest : public testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(
        WriteRandomModel(temp_.Join("model"), TinyModelConfig(ModelType::kLlama), {.seed = 3})
            .ok());
    ASSERT_TRUE(WriteRandomAdapter(temp_.Join("math"), TinyModelConfig(ModelType::kLlama),
                                   {.r = 4, .seed = 11})
                    .ok());
  }

  // Starts the binary on the tiny model with `flags` on top.
  absl::Status Start(const std::vector<std::string>& flags) {
    std::vector<std::string> args = {"--model_dir=" + temp_.Join("model"), "--device=cpu",
                                     "--listen=127.0.0.1:0", "--admin_listen=127.0.0.1:0"};
    args.insert(args.end(), flags.begin(), flags.end());
    return server_.Start(MOELORA_SERVER_BINARY, args);
  }

  testing_support::ScopedTempDir temp_{"e2e_test"};
  testing_support::ServerProcess server_{temp_.Join("stderr.log")};
};

TEST_F(ServerProcessTest, SigtermDrainsRequestsInFlightAndExitsZero) {
  const absl::Status started =
      Start({"--experts=math=" + temp_.Join("math"), "--drain_timeout=30s"});
  ASSERT_TRUE(started.ok()) << started;
  const int port = server_.data_port();
  auto stub = v1::Inference::NewStub(
      grpc::CreateChannel(absl::StrCat("127.0.0.1:", port), grpc::InsecureChannelCredentials()));

  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  v1::GenerateRequest request;
  for (int64_t id : {5, 17, 29, 2}) request.add_prompt_token_ids(id);
  request.mutable_sampling()->set_max_new_tokens(250);
  request.mutable_routing()->set_pinned_expert("math");
  auto reader = stub->Generate(&context, request);
  v1::GenerateResponse message;
  ASSERT_TRUE(reader->Read(&message));
  int64_t tokens = message.token_ids_size();

  ASSERT_EQ(kill(server_.pid(), SIGTERM), 0);
  // Draining: a new request is refused while the one in flight keeps streaming.
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  {
    grpc::ClientContext late_context;
    late_context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    v1::GenerateRequest late = request;
    late.mutable_sampling()->set_max_new_tokens(2);
    auto late_reader = stub->Generate(&late_context, late);
    v1::GenerateResponse ignored;
    while (late_reader->Read(&ignored)) {
    }
    EXPECT_EQ(late_reader->Finish().error_code(), grpc::StatusCode::UNAVAILABLE);
  }
  while (reader->Read(&message)) tokens += message.token_ids_size();
  const grpc::Status status = reader->Finish();
  EXPECT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(tokens, 250);
  EXPECT_EQ(server_.Wait(), 0);

  const std::string log = server_.log();
  EXPECT_NE(log.find("received SIGTERM"), std::string::npos) << log;
  EXPECT_NE(log.find("rpc=Generate prompt_tokens=4 generated_tokens=250"), std::string::npos)
      << log;
  EXPECT_NE(log.find("stopped"), std::string::npos) << log;
}

TEST_F(ServerProcessTest, BadStartupExitsNonZeroWithAMessage) {
  EXPECT_EQ(Start({"--experts=math=" + temp_.Join("nowhere")}).code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(server_.pid(), 0);
  EXPECT_EQ(server_.exit_code(), 1);
  EXPECT_NE(server_.log().find("start-up expert 'math'"), std::string::npos);
}

}  // namespace
}  // namespace moelora::server
