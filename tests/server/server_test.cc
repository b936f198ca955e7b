// End to end in one process: the Server on 127.0.0.1:0 with a tiny random llama, two experts
// and a router, driven through the generated C++ stubs.

#include "server/server.h"

#include <ATen/ATen.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <fstream>
#include <iterator>
#include <limits>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/generation.h"
#include "core/mixture.h"
#include "core/random_model.h"
#include "core/router.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "moelora/v1/admin.grpc.pb.h"
#include "moelora/v1/inference.grpc.pb.h"
#include "tests/testing/temp_dir.h"

namespace moelora::server {
namespace {

using ::grpc::health::v1::Health;
using ::grpc::health::v1::HealthCheckRequest;
using ::grpc::health::v1::HealthCheckResponse;

constexpr char kToken[] = "test-admin-token";
constexpr int64_t kMaxMessageBytes = 64 << 10;
const std::vector<int64_t> kPrompt = {5, 17, 29, 2};

struct Stream {
  std::vector<v1::GenerateResponse> messages;
  grpc::Status status;

  std::vector<int64_t> tokens() const {
    std::vector<int64_t> tokens;
    for (const auto& message : messages) {
      tokens.insert(tokens.end(), message.token_ids().begin(), message.token_ids().end());
    }
    return tokens;
  }
};

// Model, experts, router and token on disk, shared by every test of the binary.
struct Files {
  testing_support::ScopedTempDir temp{"server_test"};
  ModelConfig config = TinyModelConfig(ModelType::kLlama);

  std::string model() const { return temp.Join("model"); }
  std::string expert(const std::string& name) const { return temp.Join("experts/" + name); }
  std::string router() const { return temp.Join("router"); }
  std::string token() const { return temp.Join("token"); }

  absl::Status Write() {
    absl::Status status = WriteRandomModel(model(), config, {.seed = 3});
    if (!status.ok()) return status;
    status = WriteRandomAdapter(expert("math"), config, {.r = 4, .seed = 11, .std = 0.3});
    if (!status.ok()) return status;
    status = WriteRandomAdapter(
        expert("code"), config,
        {.r = 8, .target_modules = {"q_proj", "v_proj", "down_proj"}, .seed = 12, .std = 0.3});
    if (!status.ok()) return status;
    status = WriteRandomAdapter(expert("chat"), config, {.r = 2, .seed = 13, .std = 0.3});
    if (!status.ok()) return status;
    // An adapter made for a wider model (hidden 96, not 64).
    ModelConfig wider = config;
    wider.hidden_size = 96;
    status = WriteRandomAdapter(expert("wider"), wider, {.r = 2, .seed = 15});
    if (!status.ok()) return status;
    // An adapter whose config targets k_proj, with no k_proj weights in its file.
    status = WriteRandomAdapter(expert("missing-keys"), config, {.r = 2, .seed = 16});
    if (!status.ok()) return status;
    {
      std::ifstream in(expert("missing-keys") + "/adapter_config.json");
      std::string json((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
      const size_t at = json.find("\"q_proj\"");
      if (at == std::string::npos) return absl::InternalError("no q_proj in adapter_config.json");
      json.insert(at, "\"k_proj\", ");
      std::ofstream(expert("missing-keys") + "/adapter_config.json", std::ios::trunc) << json;
    }
    // A corrupt copy of an adapter: the weights file cut short.
    status = WriteRandomAdapter(expert("corrupt"), config, {.r = 2, .seed = 14});
    if (!status.ok()) return status;
    std::ofstream(expert("corrupt") + "/adapter_model.safetensors", std::ios::trunc) << "garbage";
    RouterConfig router_config;
    router_config.name = "mix";
    router_config.experts = {"math", "code"};
    at::manual_seed(5);
    auto router =
        Router::Create(router_config, at::randn({2, config.hidden_size}), at::randn({2}) * 0.1);
    if (!router.ok()) return router.status();
    status = (*router)->Save(this->router());
    if (!status.ok()) return status;
    std::ofstream(token()) << kToken << "\n";
    return absl::OkStatus();
  }

  ServerOptions Options() const {
    ServerOptions options;
    options.model_dir = model();
    options.pool = {.capacity = 4, .max_rank = 8};
    options.engine = {.max_running_requests = 4, .max_queued_requests = 16};
    options.startup.experts = {{"math", expert("math")}, {"code", expert("code")}};
    options.startup.routers = {{.path = router(), .make_default = true}};
    options.listen = "127.0.0.1:0";
    options.admin_listen = "127.0.0.1:0";
    options.max_message_bytes = kMaxMessageBytes;
    options.admin_token_file = token();
    return options;
  }
};

HealthCheckResponse::ServingStatus HealthOf(int port, const std::string& service) {
  auto stub = Health::NewStub(
      grpc::CreateChannel(absl::StrCat("127.0.0.1:", port), grpc::InsecureChannelCredentials()));
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  HealthCheckRequest request;
  request.set_service(service);
  HealthCheckResponse response;
  const grpc::Status status = stub->Check(&context, request, &response);
  if (!status.ok()) return HealthCheckResponse::UNKNOWN;
  return response.status();
}

class ServerTest : public testing::Test {
 protected:
  static void SetUpTestSuite() {
    files_ = new Files;
    const absl::Status written = files_->Write();
    if (!written.ok()) {
      setup_error_ = written.ToString();
      return;
    }
    auto server = Server::Start(files_->Options());
    if (!server.ok()) {
      setup_error_ = server.status().ToString();
      return;
    }
    server_ = server->release();
    // The reference: the same model, experts and router straight through core.
    auto model = Model::Load(files_->model());
    auto pool = ExpertPool::Create(**model, {.capacity = 4, .max_rank = 8});
    reference_model_ = model->release();
    reference_pool_ = pool->release();
    reference_ = new Mixture(*reference_model_, *reference_pool_);
    for (const char* name : {"math", "code"}) {
      if (auto info = reference_->AttachExpert(name, files_->expert(name)); !info.ok()) {
        setup_error_ = info.status().ToString();
      }
    }
    if (auto info = reference_->AttachRouter(files_->router(), false); !info.ok()) {
      setup_error_ = info.status().ToString();
    }
    if (auto status = reference_->SetDefaultRouter("mix"); !status.ok()) {
      setup_error_ = status.ToString();
    }
  }

  static void TearDownTestSuite() {
    delete server_;
    delete reference_;
    delete reference_pool_;
    delete reference_model_;
    delete files_;
  }

  void SetUp() override {
    ASSERT_TRUE(setup_error_.empty()) << setup_error_;
    auto channel = grpc::CreateChannel(absl::StrCat("127.0.0.1:", server_->data_port()),
                                       grpc::InsecureChannelCredentials());
    inference_ = v1::Inference::NewStub(channel);
    admin_ = v1::Admin::NewStub(grpc::CreateChannel(
        absl::StrCat("127.0.0.1:", server_->admin_port()), grpc::InsecureChannelCredentials()));
  }

  static void SetDeadline(grpc::ClientContext& context, int seconds = 20) {
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(seconds));
  }

  Stream Generate(const v1::GenerateRequest& request, grpc::ClientContext* context = nullptr) {
    grpc::ClientContext local;
    if (context == nullptr) {
      context = &local;
      SetDeadline(local);
    }
    Stream stream;
    auto reader = inference_->Generate(context, request);
    v1::GenerateResponse message;
    while (reader->Read(&message)) stream.messages.push_back(message);
    stream.status = reader->Finish();
    return stream;
  }

  static v1::GenerateRequest Request(const std::vector<int64_t>& prompt, uint32_t max_new_tokens) {
    v1::GenerateRequest request;
    request.mutable_prompt_token_ids()->Add(prompt.begin(), prompt.end());
    request.mutable_sampling()->set_max_new_tokens(max_new_tokens);
    return request;
  }

  std::vector<int64_t> Expected(const std::vector<int64_t>& prompt, int64_t max_new_tokens,
                                const RoutingControls& controls) {
    auto generation = GreedyGenerate(*reference_, {prompt}, max_new_tokens, controls);
    EXPECT_TRUE(generation.ok()) << generation.status();
    return generation.ok() ? generation->tokens[0] : std::vector<int64_t>{};
  }

  template <typename Request, typename Response, typename Method>
  grpc::Status Admin(Method method, const Request& request, Response* response,
                     const std::string& token = kToken) {
    grpc::ClientContext context;
    SetDeadline(context);
    if (!token.empty()) context.AddMetadata("authorization", "Bearer " + token);
    return (admin_.get()->*method)(&context, request, response);
  }

  // A short request that must succeed: the server still serves.
  void ExpectServing() {
    const Stream stream = Generate(Request(kPrompt, 2));
    EXPECT_TRUE(stream.status.ok()) << stream.status.error_message();
    EXPECT_EQ(stream.tokens().size(), 2u);
  }

  static Files* files_;
  static Server* server_;
  static Model* reference_model_;
  static ExpertPool* reference_pool_;
  static Mixture* reference_;
  static std::string setup_error_;
  std::unique_ptr<v1::Inference::Stub> inference_;
  std::unique_ptr<v1::Admin::Stub> admin_;
};

Files* ServerTest::files_ = nullptr;
Server* ServerTest::server_ = nullptr;
Model* ServerTest::reference_model_ = nullptr;
ExpertPool* ServerTest::reference_pool_ = nullptr;
Mixture* ServerTest::reference_ = nullptr;
std::string ServerTest::setup_error_;

TEST_F(ServerTest, GenerateStreamsTheMixturesGreedyTokens) {
  v1::GenerateRequest request = Request(kPrompt, 12);
  request.set_return_routing(true);
  const Stream stream = Generate(request);
  ASSERT_TRUE(stream.status.ok()) << stream.status.error_message();
  EXPECT_EQ(stream.tokens(), Expected(kPrompt, 12, {}));

  // Routing: column names in the first message, one row per token, rows summing to 1.
  ASSERT_FALSE(stream.messages.empty());
  const auto& experts = stream.messages[0].routing_experts();
  EXPECT_EQ(std::vector<std::string>(experts.begin(), experts.end()),
            (std::vector<std::string>{"math", "code"}));
  int rows = 0;
  for (const auto& message : stream.messages) {
    EXPECT_EQ(message.routing_size(), message.token_ids_size());
    for (const auto& row : message.routing()) {
      ASSERT_EQ(row.weights_size(), 2);
      EXPECT_NEAR(row.weights(0) + row.weights(1), 1.0, 1e-5);
      ++rows;
    }
  }
  EXPECT_EQ(rows, 12);

  const v1::GenerateResponse& last = stream.messages.back();
  EXPECT_EQ(last.finish_reason(), v1::FINISH_REASON_LENGTH);
  EXPECT_EQ(last.usage().prompt_tokens(), 4);
  EXPECT_EQ(last.usage().generated_tokens(), 12);
  EXPECT_GT(last.usage().total_seconds(), 0);
}

TEST_F(ServerTest, GenerateFollowsRoutingControls) {
  v1::GenerateRequest pinned = Request(kPrompt, 8);
  pinned.mutable_routing()->set_pinned_expert("code");
  EXPECT_EQ(Generate(pinned).tokens(), Expected(kPrompt, 8, {.pinned_expert = "code"}));

  v1::GenerateRequest weighted = Request(kPrompt, 8);
  (*weighted.mutable_routing()->mutable_expert_weights())["math"] = 0.3;
  (*weighted.mutable_routing()->mutable_expert_weights())["code"] = 0.7;
  EXPECT_EQ(Generate(weighted).tokens(),
            Expected(kPrompt, 8, {.explicit_weights = {{"math", 0.3}, {"code", 0.7}}}));

  v1::GenerateRequest overrides = Request(kPrompt, 8);
  overrides.mutable_routing()->set_top_k(1);
  overrides.mutable_routing()->set_temperature(0.5);
  EXPECT_EQ(Generate(overrides).tokens(), Expected(kPrompt, 8, {.top_k = 1, .temperature = 0.5}));
}

TEST_F(ServerTest, GenerateDefaultsAndStopTokens) {
  const Stream defaults = Generate(Request(kPrompt, 0));  // 0 -> 16
  ASSERT_TRUE(defaults.status.ok()) << defaults.status.error_message();
  ASSERT_EQ(defaults.tokens().size(), 16u);

  // Stop at the first token: one token, finish reason STOP.
  v1::GenerateRequest stop = Request(kPrompt, 10);
  stop.mutable_sampling()->add_stop_token_ids(defaults.tokens()[0]);
  const Stream stopped = Generate(stop);
  ASSERT_TRUE(stopped.status.ok()) << stopped.status.error_message();
  EXPECT_EQ(stopped.tokens(), std::vector<int64_t>{defaults.tokens()[0]});
  EXPECT_EQ(stopped.messages.back().finish_reason(), v1::FINISH_REASON_STOP);

  // Sampling with a seed is reproducible.
  v1::GenerateRequest sampled = Request(kPrompt, 10);
  sampled.mutable_sampling()->set_temperature(1.0);
  sampled.mutable_sampling()->set_seed(1234);
  EXPECT_EQ(Generate(sampled).tokens(), Generate(sampled).tokens());
}

TEST_F(ServerTest, ScoreMatchesTheMixturesLogSoftmax) {
  const std::vector<int64_t> tokens = {5, 17, 29, 2, 9};
  v1::ScoreRequest request;
  request.mutable_token_ids()->Add(tokens.begin(), tokens.end());
  request.set_top_n(3);
  request.set_return_routing(true);
  grpc::ClientContext context;
  SetDeadline(context);
  v1::ScoreResponse response;
  const grpc::Status status = inference_->Score(&context, request, &response);
  ASSERT_TRUE(status.ok()) << status.error_message();
  ASSERT_EQ(response.tokens_size(), 4);

  auto cache = reference_model_->CreateKvCache(1, 16);
  ASSERT_TRUE(cache.ok());
  std::vector<MixtureSequence> batch = {{{0, tokens}, {}, nullptr}};
  auto forward = reference_->Forward(batch, *cache, {.all_logits = true});
  ASSERT_TRUE(forward.ok()) << forward.status();
  const at::Tensor logprobs = forward->forward.logits.to(at::kDouble).log_softmax(-1);
  double total = 0;
  for (int i = 0; i < 4; ++i) {
    const v1::ScoredToken& scored = response.tokens(i);
    EXPECT_EQ(scored.token_id(), tokens[i + 1]);
    EXPECT_NEAR(scored.logprob(), logprobs[i][tokens[i + 1]].item<double>(), 1e-4);
    ASSERT_EQ(scored.top_size(), 3);
    EXPECT_GE(scored.top(0).logprob(), scored.top(1).logprob());
    EXPECT_GE(scored.top(1).logprob(), scored.top(2).logprob());
    total += scored.logprob();
  }
  EXPECT_NEAR(response.total_logprob(), total, 1e-9);
  EXPECT_EQ(response.routing_size(), 5);
}

TEST_F(ServerTest, GetModelInfo) {
  grpc::ClientContext context;
  SetDeadline(context);
  v1::ModelInfo info;
  ASSERT_TRUE(inference_->GetModelInfo(&context, {}, &info).ok());
  EXPECT_EQ(info.model_type(), "llama");
  EXPECT_EQ(info.model_dir(), files_->model());
  EXPECT_EQ(info.vocab_size(), files_->config.vocab_size);
  EXPECT_EQ(info.hidden_size(), 64);
  EXPECT_EQ(info.num_layers(), 2);
  EXPECT_EQ(info.dtype(), "float32");
  EXPECT_EQ(info.device(), "cpu");
  EXPECT_FALSE(info.has_tokenizer());
  EXPECT_EQ(info.limits().max_running_requests(), 4);
  EXPECT_EQ(info.limits().max_seq_len(), 256);  // min(max_position_embeddings, 4096)
  EXPECT_EQ(info.limits().kv_cache_tokens(), 4 * 256);
  EXPECT_GT(info.limits().kv_cache_bytes(), 0);
  EXPECT_EQ(info.limits().expert_pool_capacity(), 4);
  EXPECT_EQ(info.limits().expert_max_rank(), 8);
  EXPECT_EQ(info.limits().max_message_bytes(), kMaxMessageBytes);
  ASSERT_GE(info.experts_size(), 2);
  EXPECT_EQ(info.experts(0).name(), "math");
  EXPECT_EQ(info.experts(0).source(), files_->expert("math"));
  EXPECT_EQ(info.experts(0).rank(), 4);
  EXPECT_GT(info.experts(0).attach_time().seconds(), 1'600'000'000);
  ASSERT_EQ(info.routers_size(), 1);
  EXPECT_EQ(info.routers(0).name(), "mix");
  EXPECT_TRUE(info.routers(0).is_default());
  EXPECT_EQ(info.routers(0).input(), "embeddings");
}

TEST_F(ServerTest, AdminNeedsTheToken) {
  v1::ListExpertsResponse list;
  EXPECT_EQ(Admin(&v1::Admin::Stub::ListExperts, v1::ListExpertsRequest(), &list, "").error_code(),
            grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(
      Admin(&v1::Admin::Stub::ListExperts, v1::ListExpertsRequest(), &list, "wrong").error_code(),
      grpc::StatusCode::UNAUTHENTICATED);
  v1::AttachExpertRequest attach;
  attach.set_name("chat");
  attach.set_path(files_->expert("chat"));
  v1::ExpertInfo info;
  EXPECT_EQ(Admin(&v1::Admin::Stub::AttachExpert, attach, &info, "").error_code(),
            grpc::StatusCode::UNAUTHENTICATED);
  ASSERT_TRUE(Admin(&v1::Admin::Stub::ListExperts, v1::ListExpertsRequest(), &list).ok());
  EXPECT_EQ(list.experts_size(), 2);  // nothing attached by the refused call
  EXPECT_EQ(list.free_slots(), 2);
  // The admin service is not on the data port.
  auto on_data_port = v1::Admin::NewStub(grpc::CreateChannel(
      absl::StrCat("127.0.0.1:", server_->data_port()), grpc::InsecureChannelCredentials()));
  grpc::ClientContext context;
  SetDeadline(context);
  context.AddMetadata("authorization", std::string("Bearer ") + kToken);
  EXPECT_EQ(on_data_port->ListExperts(&context, {}, &list).error_code(),
            grpc::StatusCode::UNIMPLEMENTED);
}

TEST_F(ServerTest, AttachUseAndDetachAnExpert) {
  v1::AttachExpertRequest attach;
  attach.set_name("chat");
  attach.set_path(files_->expert("chat"));
  v1::ExpertInfo info;
  grpc::Status status = Admin(&v1::Admin::Stub::AttachExpert, attach, &info);
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(info.name(), "chat");
  EXPECT_EQ(info.rank(), 2);
  EXPECT_EQ(info.num_modules(), 4);  // q_proj, v_proj x 2 layers
  EXPECT_EQ(std::vector<std::string>(info.target_modules().begin(), info.target_modules().end()),
            (std::vector<std::string>{"q_proj", "v_proj"}));
  EXPECT_EQ(Admin(&v1::Admin::Stub::AttachExpert, attach, &info).error_code(),
            grpc::StatusCode::ALREADY_EXISTS);

  v1::GenerateRequest pinned = Request(kPrompt, 4);
  pinned.mutable_routing()->set_pinned_expert("chat");
  const Stream stream = Generate(pinned);
  EXPECT_TRUE(stream.status.ok()) << stream.status.error_message();
  EXPECT_EQ(stream.tokens().size(), 4u);

  v1::DetachExpertRequest detach;
  detach.set_name("chat");
  v1::DetachExpertResponse detached;
  status = Admin(&v1::Admin::Stub::DetachExpert, detach, &detached);
  ASSERT_TRUE(status.ok()) << status.error_message();
  const Stream after = Generate(pinned);
  EXPECT_EQ(after.status.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_NE(after.status.error_message().find("chat"), std::string::npos);
  EXPECT_EQ(Admin(&v1::Admin::Stub::DetachExpert, detach, &detached).error_code(),
            grpc::StatusCode::NOT_FOUND);

  // A router's expert needs force.
  detach.set_name("math");
  EXPECT_EQ(Admin(&v1::Admin::Stub::DetachExpert, detach, &detached).error_code(),
            grpc::StatusCode::FAILED_PRECONDITION);

  v1::ListRoutersResponse routers;
  ASSERT_TRUE(Admin(&v1::Admin::Stub::ListRouters, v1::ListRoutersRequest(), &routers).ok());
  EXPECT_EQ(routers.default_router(), "mix");
  ASSERT_EQ(routers.routers_size(), 1);
  EXPECT_EQ(routers.routers(0).experts_size(), 2);
  ExpectServing();
}

TEST_F(ServerTest, BadAttachesAreRefusedClearly) {
  v1::AttachExpertRequest attach;
  attach.set_name("corrupt");
  attach.set_path(files_->expert("corrupt"));
  v1::ExpertInfo info;
  grpc::Status status = Admin(&v1::Admin::Stub::AttachExpert, attach, &info);
  EXPECT_FALSE(status.ok());
  EXPECT_NE(status.error_message().find("adapter_model.safetensors"), std::string::npos)
      << status.error_message();

  attach.set_name("wider");
  attach.set_path(files_->expert("wider"));
  status = Admin(&v1::Admin::Stub::AttachExpert, attach, &info);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << status.error_message();
  EXPECT_NE(status.error_message().find("q_proj"), std::string::npos) << status.error_message();

  attach.set_name("missing-keys");
  attach.set_path(files_->expert("missing-keys"));
  status = Admin(&v1::Admin::Stub::AttachExpert, attach, &info);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << status.error_message();
  EXPECT_NE(status.error_message().find("k_proj"), std::string::npos) << status.error_message();

  attach.set_name("ghost");
  attach.set_path(files_->expert("does-not-exist"));
  status = Admin(&v1::Admin::Stub::AttachExpert, attach, &info);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::NOT_FOUND) << status.error_message();
  EXPECT_NE(status.error_message().find("does-not-exist"), std::string::npos);

  attach.set_name("");
  EXPECT_EQ(Admin(&v1::Admin::Stub::AttachExpert, attach, &info).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);

  v1::AttachRouterRequest router;
  router.set_path(files_->expert("math"));  // not a router directory
  v1::RouterInfo router_info;
  EXPECT_FALSE(Admin(&v1::Admin::Stub::AttachRouter, router, &router_info).ok());

  v1::SetDefaultRouterRequest set_default;
  set_default.set_name("nope");
  v1::SetDefaultRouterResponse set;
  EXPECT_EQ(Admin(&v1::Admin::Stub::SetDefaultRouter, set_default, &set).error_code(),
            grpc::StatusCode::NOT_FOUND);

  v1::ListExpertsResponse list;
  ASSERT_TRUE(Admin(&v1::Admin::Stub::ListExperts, v1::ListExpertsRequest(), &list).ok());
  EXPECT_EQ(list.experts_size(), 2);
  ExpectServing();
}

TEST_F(ServerTest, BadRequestsGetTheRightCodeAndTheServerKeepsServing) {
  struct Case {
    const char* what;
    v1::GenerateRequest request;
    grpc::StatusCode code;
    const char* message;  // a part of the error message
  };
  std::vector<Case> cases;
  cases.push_back({"token id out of range", Request({5, 128, 2}, 4),
                   grpc::StatusCode::INVALID_ARGUMENT, "128"});
  cases.push_back({"empty prompt", Request({}, 4), grpc::StatusCode::INVALID_ARGUMENT, "empty"});
  cases.push_back({"beyond the context", Request(kPrompt, 300), grpc::StatusCode::INVALID_ARGUMENT,
                   "max_new_tokens"});
  {
    v1::GenerateRequest text = Request({}, 4);
    text.set_prompt_text("hello");
    cases.push_back(
        {"text without a tokenizer", text, grpc::StatusCode::INVALID_ARGUMENT, "tokenizer"});
  }
  {
    v1::GenerateRequest both = Request(kPrompt, 4);
    both.set_prompt_text("hello");
    cases.push_back({"ids and text", both, grpc::StatusCode::INVALID_ARGUMENT, "not both"});
  }
  {
    v1::GenerateRequest nan = Request(kPrompt, 4);
    (*nan.mutable_routing()->mutable_expert_weights())["math"] =
        std::numeric_limits<double>::quiet_NaN();
    cases.push_back({"NaN weight", nan, grpc::StatusCode::INVALID_ARGUMENT, "math"});
  }
  {
    v1::GenerateRequest negative = Request(kPrompt, 4);
    (*negative.mutable_routing()->mutable_expert_weights())["math"] = -0.5;
    cases.push_back({"negative weight", negative, grpc::StatusCode::INVALID_ARGUMENT, "math"});
  }
  {
    v1::GenerateRequest unknown = Request(kPrompt, 4);
    unknown.mutable_routing()->set_pinned_expert("nobody");
    cases.push_back({"unknown expert", unknown, grpc::StatusCode::NOT_FOUND, "nobody"});
  }
  {
    v1::GenerateRequest unknown = Request(kPrompt, 4);
    unknown.mutable_routing()->set_router("nowhere");
    cases.push_back({"unknown router", unknown, grpc::StatusCode::NOT_FOUND, "nowhere"});
  }
  {
    v1::GenerateRequest top_k = Request(kPrompt, 4);
    top_k.mutable_routing()->set_top_k(3);  // the router has 2 experts
    cases.push_back({"router top_k too large", top_k, grpc::StatusCode::INVALID_ARGUMENT, "top_k"});
  }
  {
    v1::GenerateRequest top_p = Request(kPrompt, 4);
    top_p.mutable_sampling()->set_top_p(1.5);
    cases.push_back({"top_p", top_p, grpc::StatusCode::INVALID_ARGUMENT, "top_p"});
  }
  cases.push_back({"over the message size limit",
                   Request(std::vector<int64_t>(kMaxMessageBytes + 1000, 100), 4),
                   grpc::StatusCode::RESOURCE_EXHAUSTED, ""});
  for (const Case& c : cases) {
    const Stream stream = Generate(c.request);
    EXPECT_EQ(stream.status.error_code(), c.code)
        << c.what << ": " << stream.status.error_message();
    EXPECT_NE(stream.status.error_message().find(c.message), std::string::npos)
        << c.what << ": " << stream.status.error_message();
    EXPECT_TRUE(stream.messages.empty()) << c.what;
  }

  v1::ScoreRequest score;
  score.add_token_ids(5);
  grpc::ClientContext context;
  SetDeadline(context);
  v1::ScoreResponse response;
  EXPECT_EQ(inference_->Score(&context, score, &response).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  ExpectServing();
}

TEST_F(ServerTest, CancelAndDeadlineEndTheRequest) {
  {
    grpc::ClientContext context;
    SetDeadline(context);
    auto reader = inference_->Generate(&context, Request(kPrompt, 250));
    v1::GenerateResponse message;
    ASSERT_TRUE(reader->Read(&message));
    context.TryCancel();
    while (reader->Read(&message)) {
    }
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  }
  {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(30));
    // Long enough to outlast the deadline on any machine: requests queue behind each other.
    const Stream stream = Generate(Request(kPrompt, 250), &context);
    if (!stream.status.ok()) {
      EXPECT_EQ(stream.status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
    }
  }
  ExpectServing();
}

TEST_F(ServerTest, HealthIsServingOnBothPorts) {
  EXPECT_EQ(HealthOf(server_->data_port(), ""), HealthCheckResponse::SERVING);
  EXPECT_EQ(HealthOf(server_->data_port(), "moelora.v1.Inference"), HealthCheckResponse::SERVING);
  EXPECT_EQ(HealthOf(server_->admin_port(), ""), HealthCheckResponse::SERVING);
  EXPECT_EQ(HealthOf(server_->admin_port(), "moelora.v1.Admin"), HealthCheckResponse::SERVING);
}

// Its own server: draining ends it.
TEST_F(ServerTest, DrainTurnsHealthNotServingAndFinishesRunningRequests) {
  ServerOptions options = files_->Options();
  options.admin_on_data_port = true;
  auto started = Server::Start(options);
  ASSERT_TRUE(started.ok()) << started.status();
  std::unique_ptr<Server> server = *std::move(started);
  const int port = server->data_port();
  EXPECT_EQ(server->admin_port(), port);
  EXPECT_EQ(HealthOf(port, "moelora.v1.Admin"), HealthCheckResponse::SERVING);
  auto stub = v1::Inference::NewStub(
      grpc::CreateChannel(absl::StrCat("127.0.0.1:", port), grpc::InsecureChannelCredentials()));

  // A long request in flight: the drain waits for it.
  grpc::ClientContext context;
  SetDeadline(context, 60);
  auto reader = stub->Generate(&context, Request(kPrompt, 250));
  v1::GenerateResponse message;
  ASSERT_TRUE(reader->Read(&message));
  int64_t tokens = message.token_ids_size();

  bool drained = false;
  std::thread shutdown([&] { drained = server->Shutdown(absl::Seconds(30)); });
  // Health turns NOT_SERVING before the drain starts; the port stays open while it runs.
  HealthCheckResponse::ServingStatus health = HealthCheckResponse::SERVING;
  for (int i = 0; i < 1000 && health == HealthCheckResponse::SERVING; ++i) {
    health = HealthOf(port, "");
  }
  EXPECT_EQ(health, HealthCheckResponse::NOT_SERVING);

  while (reader->Read(&message)) tokens += message.token_ids_size();
  const grpc::Status status = reader->Finish();
  EXPECT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(tokens, 250);
  shutdown.join();
  EXPECT_TRUE(drained);
}

TEST_F(ServerTest, StartupFailsClearly) {
  ServerOptions options = files_->Options();
  options.startup.experts.push_back({"broken", files_->expert("corrupt")});
  auto server = Server::Start(options);
  ASSERT_FALSE(server.ok());
  EXPECT_NE(server.status().message().find("start-up expert 'broken'"), std::string::npos)
      << server.status();

  options = files_->Options();
  options.model_dir = files_->temp.Join("no-model");
  EXPECT_FALSE(Server::Start(options).ok());
}

TEST(ManifestTest, ParsesExpertsAndRouters) {
  auto manifest = ParseManifest(
      R"({"experts": [{"name": "math", "path": "experts/math"}, {"name": "code", "path": "/abs/code"}],
          "routers": [{"path": "r", "default": true}, {"path": "/abs/r2"}]})",
      "/etc/moelora/manifest.json");
  ASSERT_TRUE(manifest.ok()) << manifest.status();
  ASSERT_EQ(manifest->experts.size(), 2u);
  EXPECT_EQ(manifest->experts[0].name, "math");
  EXPECT_EQ(manifest->experts[0].path, "/etc/moelora/experts/math");
  EXPECT_EQ(manifest->experts[1].path, "/abs/code");
  ASSERT_EQ(manifest->routers.size(), 2u);
  EXPECT_EQ(manifest->routers[0].path, "/etc/moelora/r");
  EXPECT_TRUE(manifest->routers[0].make_default);
  EXPECT_FALSE(manifest->routers[1].make_default);

  for (const char* bad : {"[]", "{\"experts\": {}}", "{\"experts\": [{\"name\": \"x\"}]}",
                          "{\"routers\": [{\"path\": 1}]}", "{\"other\": 1}", "not json"}) {
    EXPECT_EQ(ParseManifest(bad, "m.json").status().code(), absl::StatusCode::kInvalidArgument)
        << bad;
  }
  auto experts = ParseExpertList("math=/a, code=/b");
  ASSERT_TRUE(experts.ok());
  ASSERT_EQ(experts->size(), 2u);
  EXPECT_EQ((*experts)[1].name, "code");
  EXPECT_FALSE(ParseExpertList("math").ok());
}

TEST(KvBytesTest, DerivesRunningRequests) {
  const ModelConfig config = TinyModelConfig(ModelType::kLlama);
  // 2 (k, v) * 2 layers * 256 tokens * 2 heads * 16 dims * 4 bytes = 131072 bytes per sequence.
  auto sequences = RunningRequestsForKvBytes(config, at::kFloat, 256, 3 * 131072 + 100);
  ASSERT_TRUE(sequences.ok());
  EXPECT_EQ(*sequences, 3);
  EXPECT_FALSE(RunningRequestsForKvBytes(config, at::kFloat, 256, 1000).ok());
}

}  // namespace
}  // namespace moelora::server
