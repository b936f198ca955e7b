// The real moelora-server binary as a child process: SIGTERM while a request streams lets the
// request finish, then the process exits 0.

#include <fcntl.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "core/random_model.h"
#include "moelora/v1/inference.grpc.pb.h"
#include "tests/testing/temp_dir.h"

namespace moelora::server {
namespace {

std::string ReadAll(const std::string& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

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

  void TearDown() override {
    if (pid_ > 0) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
  }

  // Starts the binary with stderr to a file; returns the data port it reports.
  // With `expect_exit`, waits for the child to exit instead (pid_ is then 0).
  int Start(std::vector<std::string> flags, bool expect_exit = false) {
    const std::string log = temp_.Join("stderr.log");
    std::vector<std::string> args = {MOELORA_SERVER_BINARY, "--model_dir=" + temp_.Join("model"),
                                     "--device=cpu", "--listen=127.0.0.1:0",
                                     "--admin_listen=127.0.0.1:0"};
    args.insert(args.end(), flags.begin(), flags.end());
    std::vector<char*> argv;
    for (std::string& arg : args) argv.push_back(arg.data());
    argv.push_back(nullptr);
    const int fd = open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    EXPECT_GE(fd, 0);
    pid_ = fork();
    if (pid_ == 0) {
      dup2(fd, STDERR_FILENO);
      dup2(fd, STDOUT_FILENO);
      execv(argv[0], argv.data());
      _exit(127);
    }
    close(fd);
    const std::string marker = "serving on port ";
    for (int i = 0; i < 600; ++i) {
      const std::string text = ReadAll(log);
      const size_t at = text.find(marker);
      if (at != std::string::npos) {
        const size_t end = text.find(',', at);
        int port = 0;
        if (absl::SimpleAtoi(text.substr(at + marker.size(), end - at - marker.size()), &port)) {
          return port;
        }
      }
      int status = 0;
      if (waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = 0;
        if (!expect_exit) ADD_FAILURE() << "moelora-server exited at start-up:\n" << text;
        exit_code_ = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
        return 0;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    ADD_FAILURE() << "moelora-server did not report its port:\n" << ReadAll(log);
    return 0;
  }

  // Waits for the child; its exit code, or -1.
  int Wait() {
    int status = 0;
    for (int i = 0; i < 600; ++i) {
      if (waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = 0;
        return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return -1;
  }

  testing_support::ScopedTempDir temp_{"e2e_test"};
  pid_t pid_ = 0;
  int exit_code_ = -1;
};

TEST_F(ServerProcessTest, SigtermDrainsRequestsInFlightAndExitsZero) {
  const int port = Start({"--experts=math=" + temp_.Join("math"), "--drain_timeout=30s"});
  ASSERT_GT(port, 0);
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

  ASSERT_EQ(kill(pid_, SIGTERM), 0);
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
  EXPECT_EQ(Wait(), 0);

  const std::string log = ReadAll(temp_.Join("stderr.log"));
  EXPECT_NE(log.find("received SIGTERM"), std::string::npos) << log;
  EXPECT_NE(log.find("rpc=Generate prompt_tokens=4 generated_tokens=250"), std::string::npos)
      << log;
  EXPECT_NE(log.find("stopped"), std::string::npos) << log;
}

TEST_F(ServerProcessTest, BadStartupExitsNonZeroWithAMessage) {
  Start({"--experts=math=" + temp_.Join("nowhere")}, /*expect_exit=*/true);
  EXPECT_EQ(pid_, 0);
  EXPECT_EQ(exit_code_, 1);
  EXPECT_NE(ReadAll(temp_.Join("stderr.log")).find("start-up expert 'math'"), std::string::npos);
}

}  // namespace
}  // namespace moelora::server
