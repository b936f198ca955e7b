// 16 concurrent streaming clients while another thread attaches and detaches experts and routers
// in a loop: no request fails, and every output equals the same request run alone.

#include <ATen/ATen.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <iostream>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "core/random_model.h"
#include "core/router.h"
#include "moelora/v1/admin.grpc.pb.h"
#include "moelora/v1/inference.grpc.pb.h"
#include "server/server.h"
#include "tests/testing/temp_dir.h"

namespace moelora::server {
namespace {

constexpr int kClients = 16;
constexpr int kRequestsPerClient = 6;
constexpr absl::Duration kLoadTime = absl::Seconds(3);

struct Outcome {
  grpc::Status status;
  std::vector<int64_t> tokens;
  int64_t finish_reason = 0;
};

Outcome Generate(v1::Inference::Stub& stub, const v1::GenerateRequest& request) {
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  auto reader = stub.Generate(&context, request);
  Outcome outcome;
  v1::GenerateResponse response;
  while (reader->Read(&response)) {
    outcome.tokens.insert(outcome.tokens.end(), response.token_ids().begin(),
                          response.token_ids().end());
    if (response.finish_reason() != v1::FINISH_REASON_UNSPECIFIED) {
      outcome.finish_reason = response.finish_reason();
    }
  }
  outcome.status = reader->Finish();
  return outcome;
}

class HotSwapTest : public testing::Test {
 protected:
  void SetUp() override {
    const ModelConfig config = TinyModelConfig(ModelType::kLlama);
    ASSERT_TRUE(WriteRandomModel(temp_.Join("model"), config, {.seed = 21}).ok());
    const char* names[] = {"math", "code", "chat", "spare"};
    for (int i = 0; i < 4; ++i) {
      ASSERT_TRUE(WriteRandomAdapter(temp_.Join(names[i]), config,
                                     {.r = 2 + 2 * i,
                                      .target_modules = {"q_proj", "v_proj", "up_proj"},
                                      .seed = static_cast<uint64_t>(30 + i),
                                      .std = 0.3})
                      .ok());
    }
    for (const auto& [name, experts] :
         std::vector<std::pair<std::string, std::vector<std::string>>>{
             {"stable", {"math", "code", "chat"}}, {"swapped", {"math", "spare"}}}) {
      RouterConfig router_config;
      router_config.name = name;
      router_config.experts = experts;
      at::manual_seed(name.size());
      const int64_t k = static_cast<int64_t>(experts.size());
      auto router =
          Router::Create(router_config, at::randn({k, config.hidden_size}), at::randn({k}) * 0.1);
      ASSERT_TRUE(router.ok());
      ASSERT_TRUE((*router)->Save(temp_.Join("router-" + name)).ok());
    }
    ServerOptions options;
    options.model_dir = temp_.Join("model");
    options.pool = {.capacity = 6, .max_rank = 8};
    options.engine = {.max_running_requests = 8, .max_seq_len = 64, .max_queued_requests = 64};
    options.startup.experts = {
        {"math", temp_.Join("math")}, {"code", temp_.Join("code")}, {"chat", temp_.Join("chat")}};
    options.startup.routers = {{.path = temp_.Join("router-stable"), .make_default = true}};
    options.listen = "127.0.0.1:0";
    options.admin_listen = "127.0.0.1:0";
    options.log_requests = false;
    auto server = Server::Start(options);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = std::move(*server);
    channel_ = grpc::CreateChannel(absl::StrCat("127.0.0.1:", server_->data_port()),
                                   grpc::InsecureChannelCredentials());
    admin_ = v1::Admin::NewStub(grpc::CreateChannel(
        absl::StrCat("127.0.0.1:", server_->admin_port()), grpc::InsecureChannelCredentials()));
  }

  void TearDown() override {
    if (server_ != nullptr) server_->Shutdown(absl::Seconds(5));
  }

  // A mix of what clients send: routers by name, pins, explicit weights, greedy and seeded.
  std::vector<v1::GenerateRequest> Requests() const {
    std::vector<v1::GenerateRequest> requests;
    for (int i = 0; i < 8; ++i) {
      v1::GenerateRequest request;
      for (int j = 0; j <= i % 5; ++j) request.add_prompt_token_ids((7 * i + 3 * j + 1) % 128);
      request.mutable_sampling()->set_max_new_tokens(4 + i % 5);
      if (i % 2 == 1) {
        request.mutable_sampling()->set_temperature(0.8);
        request.mutable_sampling()->set_top_p(0.9);
        request.mutable_sampling()->set_seed(100 + i);
      }
      switch (i % 4) {
        case 0:
          request.mutable_routing()->set_router("stable");
          break;
        case 1:
          request.mutable_routing()->set_pinned_expert(i % 8 == 1 ? "math" : "chat");
          break;
        case 2:
          (*request.mutable_routing()->mutable_expert_weights())["code"] = 0.7;
          (*request.mutable_routing()->mutable_expert_weights())["math"] = 0.3;
          break;
        case 3:
          request.mutable_routing()->set_router("stable");
          request.mutable_routing()->set_top_k(2);
          break;
      }
      requests.push_back(request);
    }
    // Two through the default router, which the admin thread keeps switching: their output
    // must be that of one of the two routers, whichever was the default at admission.
    for (int i = 0; i < 2; ++i) {
      v1::GenerateRequest request;
      request.add_prompt_token_ids(11 + i);
      request.add_prompt_token_ids(40 + i);
      request.mutable_sampling()->set_max_new_tokens(6);
      requests.push_back(request);
    }
    return requests;
  }

  void Admin(bool attach_swapped) {
    grpc::ClientContext attach_context, router_context;
    if (attach_swapped) {
      v1::AttachExpertRequest attach;
      attach.set_name("spare");
      attach.set_path(temp_.Join("spare"));
      v1::ExpertInfo info;
      ASSERT_TRUE(admin_->AttachExpert(&attach_context, attach, &info).ok());
      v1::AttachRouterRequest router;
      router.set_path(temp_.Join("router-swapped"));
      v1::RouterInfo router_info;
      ASSERT_TRUE(admin_->AttachRouter(&router_context, router, &router_info).ok());
    } else {
      v1::DetachRouterRequest router;
      router.set_name("swapped");
      v1::DetachRouterResponse router_response;
      ASSERT_TRUE(admin_->DetachRouter(&router_context, router, &router_response).ok());
      v1::DetachExpertRequest detach;
      detach.set_name("spare");
      v1::DetachExpertResponse response;
      ASSERT_TRUE(admin_->DetachExpert(&attach_context, detach, &response).ok());
    }
  }

  testing_support::ScopedTempDir temp_{"hot_swap_test"};
  std::unique_ptr<Server> server_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::Admin::Stub> admin_;
};

TEST_F(HotSwapTest, SixteenClientsWhileExpertsAndRoutersSwap) {
  const std::vector<v1::GenerateRequest> requests = Requests();
  // Each request alone, a request without routing sent through `router`.
  auto stub = v1::Inference::NewStub(channel_);
  auto run_alone = [&](const std::string& router, std::vector<Outcome>& outcomes) {
    for (const auto& request : requests) {
      v1::GenerateRequest alone = request;
      if (!request.has_routing()) alone.mutable_routing()->set_router(router);
      outcomes.push_back(Generate(*stub, alone));
      ASSERT_TRUE(outcomes.back().status.ok()) << outcomes.back().status.error_message();
    }
  };
  std::vector<Outcome> expected, alternative;
  ASSERT_NO_FATAL_FAILURE(run_alone("stable", expected));  // before anything swaps
  Admin(/*attach_swapped=*/true);
  ASSERT_NO_FATAL_FAILURE(run_alone("swapped", alternative));
  Admin(/*attach_swapped=*/false);
  // An attached expert that a request does not use changes nothing in its output.
  for (size_t i = 0; i < requests.size(); ++i) {
    if (requests[i].has_routing()) {
      EXPECT_EQ(alternative[i].tokens, expected[i].tokens) << i;
    }
  }

  std::atomic<bool> done{false};
  std::atomic<int> swaps{0};
  std::atomic<int> slots_full{0};
  std::vector<std::string> admin_errors;
  std::thread admin([&] {
    while (!done.load()) {
      // An expert detached while requests that pinned it still run keeps its slot until they
      // finish, so an attach may find every slot taken: RESOURCE_EXHAUSTED is back-pressure,
      // not a failure. The calls that depend on it then fail with NOT_FOUND / FAILED_PRECONDITION.
      bool attached = true;
      const auto call = [&](auto method, const auto& request, auto* response) {
        grpc::ClientContext context;
        const grpc::Status status = ((*admin_).*method)(&context, request, response);
        if (status.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED) {
          attached = false;
          ++slots_full;
        } else if (!status.ok() && attached) {
          admin_errors.push_back(status.error_message());
        }
      };
      v1::AttachExpertRequest attach;
      attach.set_name("spare");
      attach.set_path(temp_.Join("spare"));
      v1::ExpertInfo info;
      call(&v1::Admin::Stub::AttachExpert, attach, &info);
      v1::AttachRouterRequest router;
      router.set_path(temp_.Join("router-swapped"));
      v1::RouterInfo router_info;
      call(&v1::Admin::Stub::AttachRouter, router, &router_info);
      v1::SetDefaultRouterRequest make_default;
      make_default.set_name("swapped");
      v1::SetDefaultRouterResponse default_response;
      call(&v1::Admin::Stub::SetDefaultRouter, make_default, &default_response);
      absl::SleepFor(absl::Milliseconds(5));
      make_default.set_name("stable");
      call(&v1::Admin::Stub::SetDefaultRouter, make_default, &default_response);
      v1::DetachRouterRequest detach_router;
      detach_router.set_name("swapped");
      v1::DetachRouterResponse detach_router_response;
      call(&v1::Admin::Stub::DetachRouter, detach_router, &detach_router_response);
      v1::DetachExpertRequest detach;
      detach.set_name("spare");
      v1::DetachExpertResponse detach_response;
      call(&v1::Admin::Stub::DetachExpert, detach, &detach_response);
      if (attached) ++swaps;
    }
  });

  const absl::Time load_end = absl::Now() + kLoadTime;
  absl::Mutex mu;
  std::vector<std::string> failures;
  std::atomic<int> completed{0};
  std::vector<std::thread> clients;
  for (int c = 0; c < kClients; ++c) {
    clients.emplace_back([&, c] {
      auto client_stub = v1::Inference::NewStub(channel_);
      // At least kRequestsPerClient each, and for kLoadTime in all.
      for (int r = 0; r < kRequestsPerClient || absl::Now() < load_end; ++r) {
        const size_t index = (c * kRequestsPerClient + r) % requests.size();
        const Outcome outcome = Generate(*client_stub, requests[index]);
        std::string failure;
        if (!outcome.status.ok()) {
          failure = absl::StrCat("request ", index, ": ", outcome.status.error_message());
        } else if (outcome.tokens != expected[index].tokens &&
                   (requests[index].has_routing() || outcome.tokens != alternative[index].tokens)) {
          failure = absl::StrCat("request ", index, ": tokens differ from the lone run");
        }
        ++completed;
        if (!failure.empty()) {
          absl::MutexLock lock(&mu);
          failures.push_back(failure);
        }
      }
    });
  }
  for (auto& client : clients) client.join();
  done = true;
  admin.join();

  EXPECT_TRUE(failures.empty()) << failures.size() << " failed, first: " << failures.front();
  EXPECT_TRUE(admin_errors.empty()) << admin_errors.front();
  EXPECT_GT(swaps.load(), 0) << slots_full.load() << " attaches found no free slot";
  EXPECT_GE(completed.load(), kClients * kRequestsPerClient);
  std::cout << completed.load() << " requests, " << swaps.load() << " full swap cycles, "
            << slots_full.load() << " attaches waited for a slot\n";
  const EngineStats stats = server_->engine().stats();
  EXPECT_EQ(stats.running, 0);
  EXPECT_EQ(stats.kv_slots_used, 0);
  EXPECT_EQ(stats.queued, 0);
}

}  // namespace
}  // namespace moelora::server
