#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_split.h"
#include "absl/synchronization/mutex.h"
#include "client/cli_commands.h"
#include "client/cli_format.h"
#include "gmock/gmock.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/health_check_service_interface.h"
#include "gtest/gtest.h"
#include "moelora/v1/admin.grpc.pb.h"
#include "moelora/v1/inference.grpc.pb.h"
#include "nlohmann/json.hpp"
#include "tests/testing/temp_dir.h"

namespace moelora::cli {
namespace {

using ::nlohmann::json;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::Pair;
using ::testing::StartsWith;

template <typename T>
std::string Message(const absl::StatusOr<T>& result) {
  return std::string(result.status().message());
}

// ---- Parsing ----------------------------------------------------------------------------------

TEST(ParseIdsTest, ParsesCommaSeparatedIds) {
  EXPECT_THAT(*ParseIds("1,2,3"), ElementsAre(1, 2, 3));
  EXPECT_THAT(*ParseIds(" 7 , 0,123456789012 "), ElementsAre(7, 0, 123456789012));
  EXPECT_TRUE(ParseIds("")->empty());
  EXPECT_TRUE(ParseIds("   ")->empty());
}

TEST(ParseIdsTest, RejectsBadInput) {
  for (const char* bad : {"1,,2", "1,", ",1", "1,x", "1.5", "-1", "1 2", "99999999999999999999"}) {
    const auto ids = ParseIds(bad);
    EXPECT_EQ(ids.status().code(), absl::StatusCode::kInvalidArgument) << bad;
  }
  EXPECT_THAT(Message(ParseIds("4,abc")), HasSubstr("element 1 (\"abc\")"));
  EXPECT_THAT(Message(ParseIds("4,-2")), HasSubstr("negative"));
  EXPECT_THAT(Message(ParseIds("4,,5")), HasSubstr("element 1 is empty"));
}

TEST(ParseWeightsTest, ParsesNameWeightPairs) {
  EXPECT_THAT(*ParseWeights("a:0.5,b:1"), ElementsAre(Pair("a", 0.5), Pair("b", 1.0)));
  EXPECT_THAT(*ParseWeights(" math : 0.25 , code:1e-1"),
              ElementsAre(Pair("code", 0.1), Pair("math", 0.25)));
  EXPECT_TRUE(ParseWeights("")->empty());
  // The range is the server's to check: a negative weight parses.
  EXPECT_THAT(*ParseWeights("a:-1"), ElementsAre(Pair("a", -1.0)));
}

TEST(ParseWeightsTest, RejectsBadInput) {
  for (const char* bad :
       {"a", "a:", ":1", "a:x", "a:1,a:2", "a:nan", "a:inf", "a:1,,b:2", "a:1;b:2"}) {
    EXPECT_EQ(ParseWeights(bad).status().code(), absl::StatusCode::kInvalidArgument) << bad;
  }
  EXPECT_THAT(Message(ParseWeights("a:1,a:2")), HasSubstr("'a' given twice"));
  EXPECT_THAT(Message(ParseWeights("math")), HasSubstr("not name:weight"));
}

TEST(ParseNamesTest, ParsesAndRejects) {
  EXPECT_THAT(*ParseNames("a, b"), ElementsAre("a", "b"));
  EXPECT_TRUE(ParseNames("")->empty());
  EXPECT_FALSE(ParseNames("a,,b").ok());
  EXPECT_FALSE(ParseNames("a,a").ok());
}

TEST(BuildGenerateRequestTest, MapsEveryFlag) {
  GenerateFlags flags{.request_id = "r1",
                      .prompt_ids = "1,2,3",
                      .max_new_tokens = 8,
                      .temperature = 0.7,
                      .top_k = 40,
                      .top_p = 0.9,
                      .seed = 1234,
                      .stop_ids = "2,7",
                      .routing = {.router = "r",
                                  .weights = "math:0.3,code:0.7",
                                  .pin = "math",
                                  .mask = "code",
                                  .top_k = 1,
                                  .temperature = 0.5,
                                  .show_routing = true}};
  const auto request = BuildGenerateRequest(flags);
  ASSERT_TRUE(request.ok()) << request.status();
  EXPECT_EQ(request->request_id(), "r1");
  EXPECT_THAT(request->prompt_token_ids(), ElementsAre(1, 2, 3));
  EXPECT_EQ(request->prompt_text(), "");
  EXPECT_EQ(request->sampling().max_new_tokens(), 8u);
  EXPECT_DOUBLE_EQ(request->sampling().temperature(), 0.7);
  EXPECT_EQ(request->sampling().top_k(), 40u);
  EXPECT_DOUBLE_EQ(request->sampling().top_p(), 0.9);
  EXPECT_EQ(request->sampling().seed(), 1234u);
  EXPECT_THAT(request->sampling().stop_token_ids(), ElementsAre(2, 7));
  const v1::RoutingControls& routing = request->routing();
  EXPECT_EQ(routing.router(), "r");
  EXPECT_EQ(routing.pinned_expert(), "math");
  EXPECT_EQ(routing.expert_weights().size(), 2u);
  EXPECT_DOUBLE_EQ(routing.expert_weights().at("code"), 0.7);
  EXPECT_THAT(routing.masked_experts(), ElementsAre("code"));
  ASSERT_TRUE(routing.has_top_k());
  EXPECT_EQ(routing.top_k(), 1u);
  ASSERT_TRUE(routing.has_temperature());
  EXPECT_DOUBLE_EQ(routing.temperature(), 0.5);
  EXPECT_TRUE(request->return_routing());
}

TEST(BuildGenerateRequestTest, RouterOverridesStayUnsetUnlessGiven) {
  const auto request = BuildGenerateRequest({.prompt = "hello"});
  ASSERT_TRUE(request.ok());
  EXPECT_EQ(request->prompt_text(), "hello");
  EXPECT_TRUE(request->prompt_token_ids().empty());
  EXPECT_FALSE(request->routing().has_top_k());
  EXPECT_FALSE(request->routing().has_temperature());
  EXPECT_FALSE(request->return_routing());
  // route_top_k=0 is "dense", which differs from unset.
  const auto dense = BuildGenerateRequest({.prompt = "x", .routing = {.top_k = 0}});
  ASSERT_TRUE(dense.ok());
  EXPECT_TRUE(dense->routing().has_top_k());
}

TEST(BuildGenerateRequestTest, RejectsBadFlags) {
  EXPECT_THAT(Message(BuildGenerateRequest({})), HasSubstr("is required"));
  EXPECT_THAT(Message(BuildGenerateRequest({.prompt_ids = "1", .prompt = "a"})),
              HasSubstr("not both"));
  EXPECT_THAT(Message(BuildGenerateRequest({.prompt_ids = "1,a"})), StartsWith("--prompt_ids: "));
  EXPECT_THAT(Message(BuildGenerateRequest({.prompt_ids = "1", .stop_ids = "x"})),
              StartsWith("--stop_ids: "));
  EXPECT_THAT(Message(BuildGenerateRequest({.prompt_ids = "1", .routing = {.weights = "a"}})),
              StartsWith("--weights: "));
  EXPECT_THAT(Message(BuildGenerateRequest({.prompt_ids = "1", .routing = {.mask = "a,a"}})),
              StartsWith("--mask: "));
  EXPECT_FALSE(BuildGenerateRequest({.prompt_ids = "1", .max_new_tokens = -1}).ok());
  EXPECT_FALSE(BuildGenerateRequest({.prompt_ids = "1", .top_k = -1}).ok());
  EXPECT_FALSE(BuildGenerateRequest({.prompt_ids = "1", .routing = {.top_k = -1}}).ok());
}

TEST(BuildScoreRequestTest, MapsFlags) {
  const auto request = BuildScoreRequest(
      {.ids = "4,5,6", .top_n = 3, .routing = {.pin = "code", .show_routing = true}});
  ASSERT_TRUE(request.ok()) << request.status();
  EXPECT_THAT(request->token_ids(), ElementsAre(4, 5, 6));
  EXPECT_EQ(request->top_n(), 3u);
  EXPECT_EQ(request->routing().pinned_expert(), "code");
  EXPECT_TRUE(request->return_routing());
  EXPECT_FALSE(BuildScoreRequest({}).ok());
  EXPECT_FALSE(BuildScoreRequest({.ids = "1,2", .text = "x"}).ok());
  EXPECT_FALSE(BuildScoreRequest({.ids = "1,2", .top_n = -3}).ok());
}

// ---- Errors -----------------------------------------------------------------------------------

TEST(ErrorTest, NamesTheCodeAndMapsExitCodes) {
  EXPECT_EQ(FormatError(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "bad ids")),
            "error: INVALID_ARGUMENT: bad ids");
  EXPECT_EQ(FormatError(absl::NotFoundError("no file")), "error: NOT_FOUND: no file");
  EXPECT_EQ(ExitCodeFor(grpc::StatusCode::OK), kExitOk);
  EXPECT_EQ(ExitCodeFor(grpc::StatusCode::UNAVAILABLE), kExitUnavailable);
  EXPECT_EQ(ExitCodeFor(grpc::StatusCode::DEADLINE_EXCEEDED), kExitDeadline);
  EXPECT_EQ(ExitCodeFor(grpc::StatusCode::OUT_OF_RANGE), kExitRejected);
  EXPECT_EQ(ExitCodeFor(grpc::StatusCode::FAILED_PRECONDITION), kExitRejected);
  EXPECT_EQ(ExitCodeFor(grpc::StatusCode::ALREADY_EXISTS), kExitNotFound);
  EXPECT_EQ(ExitCodeFor(grpc::StatusCode::UNAUTHENTICATED), kExitUnauthorized);
  EXPECT_EQ(ExitCodeFor(grpc::StatusCode::RESOURCE_EXHAUSTED), kExitOverloaded);
  EXPECT_EQ(ExitCodeFor(grpc::StatusCode::INTERNAL), kExitError);
  for (int code = 0; code <= 16; ++code) {
    EXPECT_THAT(GrpcCodeName(static_cast<grpc::StatusCode>(code)),
                ::testing::Not(StartsWith("CODE_")));
  }
}

// ---- Output -----------------------------------------------------------------------------------

// A three-message stream: routing names in the first, finish and usage in the last.
std::vector<v1::GenerateResponse> SampleStream(bool with_routing, bool with_text) {
  std::vector<v1::GenerateResponse> messages(3);
  const int64_t ids[] = {42, 7, 2};
  const float weights[][2] = {{0.71f, 0.29f}, {0.5f, 0.5f}, {0.1f, 0.9f}};
  const char* texts[] = {"Hel", "lo", "!"};
  for (int i = 0; i < 3; ++i) {
    messages[i].add_token_ids(ids[i]);
    if (with_text) messages[i].set_text(texts[i]);
    if (with_routing) {
      if (i == 0) {
        messages[i].add_routing_experts("math");
        messages[i].add_routing_experts("code");
      }
      v1::TokenRouting* row = messages[i].add_routing();
      row->add_weights(weights[i][0]);
      row->add_weights(weights[i][1]);
    }
  }
  messages[2].set_finish_reason(v1::FINISH_REASON_STOP);
  v1::Usage* usage = messages[2].mutable_usage();
  usage->set_prompt_tokens(3);
  usage->set_generated_tokens(3);
  usage->set_queue_seconds(0.0001);
  usage->set_time_to_first_token_seconds(0.0123);
  usage->set_total_seconds(0.0401);
  return messages;
}

std::string PrintStream(OutputFormat format, bool show_routing, bool stream_text,
                        const std::vector<v1::GenerateResponse>& messages) {
  std::ostringstream out;
  GeneratePrinter printer(out, format, show_routing, stream_text);
  for (const auto& message : messages) printer.OnMessage(message);
  printer.Finish();
  return out.str();
}

TEST(GeneratePrinterTest, HumanPrintsIdsOnOneLineThenTheSummary) {
  EXPECT_EQ(PrintStream(OutputFormat::kHuman, false, false, SampleStream(false, false)),
            "42 7 2\n"
            "finish=stop tokens=3 prompt=3 queue=0.1ms ttft=12.3ms total=40.1ms\n");
  EXPECT_EQ(PrintStream(OutputFormat::kHuman, false, false, SampleStream(false, true)),
            "42 7 2\n"
            "text: Hello!\n"
            "finish=stop tokens=3 prompt=3 queue=0.1ms ttft=12.3ms total=40.1ms\n");
}

TEST(GeneratePrinterTest, HumanStreamsTextOnRequest) {
  EXPECT_EQ(PrintStream(OutputFormat::kHuman, false, true, SampleStream(false, true)),
            "Hello!\n"
            "finish=stop tokens=3 prompt=3 queue=0.1ms ttft=12.3ms total=40.1ms\n");
}

TEST(GeneratePrinterTest, HumanShowsRoutingPerToken) {
  EXPECT_EQ(PrintStream(OutputFormat::kHuman, true, false, SampleStream(true, false)),
            "token 42  math=0.71 code=0.29\n"
            "token 7  math=0.50 code=0.50\n"
            "token 2  math=0.10 code=0.90\n"
            "finish=stop tokens=3 prompt=3 queue=0.1ms ttft=12.3ms total=40.1ms\n");
  EXPECT_THAT(PrintStream(OutputFormat::kHuman, true, false, SampleStream(true, true)),
              HasSubstr("token 42  math=0.71 code=0.29  \"Hel\"\n"));
}

TEST(GeneratePrinterTest, AbortEndsTheOpenLine) {
  std::ostringstream out;
  GeneratePrinter printer(out, OutputFormat::kHuman, false, false);
  printer.OnMessage(SampleStream(false, false)[0]);
  printer.Abort();
  EXPECT_EQ(out.str(), "42\n");
}

TEST(GeneratePrinterTest, JsonPrintsOneLinePerMessageThenASummary) {
  const std::string output =
      PrintStream(OutputFormat::kJson, true, false, SampleStream(true, true));
  const std::vector<std::string> lines = absl::StrSplit(output, '\n', absl::SkipEmpty());
  ASSERT_EQ(lines.size(), 4u);
  const json first = json::parse(lines[0]);
  EXPECT_EQ(first["type"], "message");
  EXPECT_EQ(first["token_ids"], json::array({42}));
  EXPECT_EQ(first["text"], "Hel");
  EXPECT_EQ(first["routing_experts"], json::array({"math", "code"}));
  EXPECT_EQ(first["routing"], json::parse(R"([{"math":0.71,"code":0.29}])"));
  EXPECT_FALSE(first.contains("finish_reason"));
  // The expert order is kept, and weights print as the floats they were.
  EXPECT_THAT(lines[0], HasSubstr(R"("routing":[{"math":0.71,"code":0.29}])"));
  const json second = json::parse(lines[1]);
  EXPECT_FALSE(second.contains("routing_experts"));
  EXPECT_EQ(second["routing"], json::parse(R"([{"math":0.5,"code":0.5}])"));
  const json last = json::parse(lines[2]);
  EXPECT_EQ(last["finish_reason"], "stop");
  EXPECT_EQ(last["usage"]["generated_tokens"], 3);
  const json summary = json::parse(lines[3]);
  EXPECT_EQ(summary["type"], "summary");
  EXPECT_EQ(summary["token_ids"], json::array({42, 7, 2}));
  EXPECT_EQ(summary["text"], "Hello!");
  EXPECT_EQ(summary["finish_reason"], "stop");
  EXPECT_DOUBLE_EQ(summary["usage"]["time_to_first_token_seconds"].get<double>(), 0.0123);
  EXPECT_EQ(summary["usage"]["prompt_tokens"], 3);
}

TEST(FormatTest, CleanFloatAndBytes) {
  EXPECT_EQ(CleanFloat(0.71f), 0.71);
  EXPECT_EQ(CleanFloat(1.0f / 3), 0.33333334);
  EXPECT_EQ(static_cast<float>(CleanFloat(1e-8f)), 1e-8f);
  EXPECT_EQ(FormatBytes(512), "512 B");
  EXPECT_EQ(FormatBytes(1536), "1.5 KiB");
  EXPECT_EQ(FormatBytes(int64_t{3} << 30), "3.0 GiB");
}

v1::ScoreResponse SampleScore() {
  v1::ScoreResponse response;
  for (const auto& [id, logprob] : {std::pair<int64_t, double>{5, -1.5}, {6, -0.25}}) {
    v1::ScoredToken* token = response.add_tokens();
    token->set_token_id(id);
    token->set_logprob(logprob);
    v1::TokenLogprob* top = token->add_top();
    top->set_token_id(9);
    top->set_logprob(-0.125);
  }
  response.set_total_logprob(-1.75);
  response.add_routing_experts("math");
  for (int i = 0; i < 3; ++i) response.add_routing()->add_weights(1.0f);
  return response;
}

TEST(FormatTest, ScoreHumanAndJson) {
  v1::ScoreRequest request;
  for (int64_t id : {4, 5, 6}) request.add_token_ids(id);
  EXPECT_EQ(FormatScore(request, SampleScore(), /*show_routing=*/true),
            "pos  token  logprob  top\n"
            "0    4      -\n"
            "1    5      -1.5000  9:-0.1250\n"
            "2    6      -0.2500  9:-0.1250\n"
            "total_logprob=-1.7500 scored=2\n"
            "token 4  math=1.00\n"
            "token 5  math=1.00\n"
            "token 6  math=1.00\n");
  const json score = json::parse(ToJson(SampleScore()).dump());
  EXPECT_EQ(score["tokens"][0]["token_id"], 5);
  EXPECT_EQ(score["tokens"][1]["top"][0]["logprob"], -0.125);
  EXPECT_EQ(score["total_logprob"], -1.75);
  EXPECT_EQ(score["routing"], json::parse(R"([{"math":1},{"math":1},{"math":1}])"));
}

v1::ExpertInfo SampleExpert() {
  v1::ExpertInfo expert;
  expert.set_name("math");
  expert.set_source("/adapters/math");
  expert.set_slot(0);
  expert.set_rank(16);
  expert.set_num_modules(64);
  expert.add_target_modules("q_proj");
  expert.add_target_modules("v_proj");
  expert.set_device_bytes(int64_t{3} << 20);
  expert.set_reserved_bytes(int64_t{4} << 20);
  expert.mutable_attach_time()->set_seconds(1700000000);
  expert.mutable_attach_time()->set_nanos(500000000);
  expert.set_requests_served(12);
  return expert;
}

v1::RouterInfo SampleRouter() {
  v1::RouterInfo router;
  router.set_name("mix");
  router.add_experts("math");
  router.add_experts("code");
  router.set_input("embeddings");
  router.set_granularity("token");
  router.set_top_k(0);
  router.set_temperature(1);
  router.set_is_default(true);
  router.add_missing_experts("code");
  return router;
}

TEST(FormatTest, ExpertsAndRouters) {
  v1::ListExpertsResponse experts;
  *experts.add_experts() = SampleExpert();
  experts.set_free_slots(7);
  const std::string table = FormatListExperts(experts);
  EXPECT_THAT(table, HasSubstr("NAME  SLOT  RANK  MODULES"));
  EXPECT_THAT(table, HasSubstr("math  0     16    64 (q_proj,v_proj)  3.0 MiB  4.0 MiB"));
  EXPECT_THAT(table, HasSubstr("  2023-11-14T22:13:20Z  "));  // to the second
  EXPECT_THAT(table, HasSubstr("free slots: 7\n"));
  EXPECT_EQ(FormatListExperts(v1::ListExpertsResponse()), "no experts attached\nfree slots: 0\n");

  const json expert = json::parse(ToJson(experts).dump());
  EXPECT_EQ(expert["free_slots"], 7);
  EXPECT_EQ(expert["experts"][0]["device_bytes"], 3 << 20);
  EXPECT_EQ(expert["experts"][0]["attach_time"], "2023-11-14T22:13:20.500Z");
  EXPECT_EQ(expert["experts"][0]["target_modules"], json::array({"q_proj", "v_proj"}));

  v1::ListRoutersResponse routers;
  *routers.add_routers() = SampleRouter();
  routers.set_default_router("mix");
  const std::string router_table = FormatListRouters(routers);
  EXPECT_THAT(router_table, HasSubstr("mix   yes      math,code  embeddings  token        dense"));
  EXPECT_THAT(router_table, HasSubstr("default router: mix\n"));
  EXPECT_EQ(FormatRouter(SampleRouter()),
            "router mix: experts math,code, input embeddings, granularity token, top_k dense, "
            "temperature 1, default; not attached: code\n");
  const json router = json::parse(ToJson(routers).dump());
  EXPECT_EQ(router["default_router"], "mix");
  EXPECT_EQ(router["routers"][0]["missing_experts"], json::array({"code"}));
}

TEST(FormatTest, ModelInfo) {
  v1::ModelInfo info;
  info.set_model_type("llama");
  info.set_model_dir("/models/tiny");
  info.set_vocab_size(32000);
  info.set_dtype("bfloat16");
  info.set_device("cuda:0");
  info.set_has_tokenizer(true);
  info.mutable_limits()->set_max_seq_len(4096);
  info.mutable_limits()->set_kv_cache_bytes(int64_t{2} << 30);
  *info.add_experts() = SampleExpert();
  const std::string text = FormatModelInfo(info);
  EXPECT_THAT(text, HasSubstr("model                    llama (/models/tiny)\n"));
  EXPECT_THAT(text, HasSubstr("bfloat16 on cuda:0"));
  EXPECT_THAT(text, HasSubstr("2.0 GiB"));
  EXPECT_THAT(text, HasSubstr("experts: 1\n"));
  EXPECT_THAT(text, HasSubstr("routers: 0\n"));
  const json parsed = json::parse(ToJson(info).dump());
  EXPECT_EQ(parsed["limits"]["max_seq_len"], 4096);
  EXPECT_EQ(parsed["has_tokenizer"], true);
  EXPECT_EQ(parsed["experts"][0]["name"], "math");
}

// ---- Against a fake server on loopback ----------------------------------------------------------

constexpr char kToken[] = "s3cret";

class FakeInference final : public v1::Inference::Service {
 public:
  grpc::Status Generate(grpc::ServerContext* context, const v1::GenerateRequest* request,
                        grpc::ServerWriter<v1::GenerateResponse>* writer) override {
    {
      absl::MutexLock lock(&mu_);
      last_generate_ = *request;
    }
    if (request->request_id() == "slow") {
      while (!context->IsCancelled()) std::this_thread::sleep_for(std::chrono::milliseconds(5));
      return grpc::Status(grpc::StatusCode::CANCELLED, "gone");
    }
    if (request->prompt_token_ids().empty()) {
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "empty prompt");
    }
    auto messages = SampleStream(request->return_routing(), /*with_text=*/false);
    if (request->request_id() == "fail_midway") {
      writer->Write(messages[0]);
      return grpc::Status(grpc::StatusCode::UNAVAILABLE, "shutting down");
    }
    for (const auto& message : messages) writer->Write(message);
    return grpc::Status::OK;
  }

  grpc::Status Score(grpc::ServerContext* context, const v1::ScoreRequest* request,
                     v1::ScoreResponse* response) override {
    *response = SampleScore();
    return grpc::Status::OK;
  }

  grpc::Status GetModelInfo(grpc::ServerContext* context, const v1::GetModelInfoRequest* request,
                            v1::ModelInfo* response) override {
    response->set_model_type("llama");
    response->set_vocab_size(128);
    return grpc::Status::OK;
  }

  v1::GenerateRequest last_generate() {
    absl::MutexLock lock(&mu_);
    return last_generate_;
  }

 private:
  absl::Mutex mu_;
  v1::GenerateRequest last_generate_;
};

class FakeAdmin final : public v1::Admin::Service {
 public:
  grpc::Status AttachExpert(grpc::ServerContext* context, const v1::AttachExpertRequest* request,
                            v1::ExpertInfo* response) override {
    if (grpc::Status auth = Authorize(*context); !auth.ok()) return auth;
    *response = SampleExpert();
    response->set_name(request->name());
    response->set_source(request->path());
    return grpc::Status::OK;
  }
  grpc::Status DetachExpert(grpc::ServerContext* context, const v1::DetachExpertRequest* request,
                            v1::DetachExpertResponse* response) override {
    if (grpc::Status auth = Authorize(*context); !auth.ok()) return auth;
    if (request->name() != "math") {
      return grpc::Status(grpc::StatusCode::NOT_FOUND, "no expert '" + request->name() + "'");
    }
    if (!request->force()) {
      return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, "router 'mix' names it");
    }
    return grpc::Status::OK;
  }
  grpc::Status ListExperts(grpc::ServerContext* context, const v1::ListExpertsRequest* request,
                           v1::ListExpertsResponse* response) override {
    if (grpc::Status auth = Authorize(*context); !auth.ok()) return auth;
    *response->add_experts() = SampleExpert();
    response->set_free_slots(3);
    return grpc::Status::OK;
  }
  grpc::Status SetDefaultRouter(grpc::ServerContext* context,
                                const v1::SetDefaultRouterRequest* request,
                                v1::SetDefaultRouterResponse* response) override {
    if (grpc::Status auth = Authorize(*context); !auth.ok()) return auth;
    absl::MutexLock lock(&mu_);
    default_router_ = request->name();
    return grpc::Status::OK;
  }

  std::string default_router() {
    absl::MutexLock lock(&mu_);
    return default_router_;
  }

 private:
  static grpc::Status Authorize(const grpc::ServerContext& context) {
    const auto& metadata = context.client_metadata();
    const auto it = metadata.find(kAuthorizationKey);
    if (it == metadata.end()) {
      return grpc::Status(grpc::StatusCode::UNAUTHENTICATED, "missing bearer token");
    }
    if (std::string(it->second.data(), it->second.size()) != std::string("Bearer ") + kToken) {
      return grpc::Status(grpc::StatusCode::PERMISSION_DENIED, "wrong token");
    }
    return grpc::Status::OK;
  }

  absl::Mutex mu_;
  std::string default_router_ = "unset";
};

class LoopbackTest : public ::testing::Test {
 protected:
  void SetUp() override {
    // gRPC's own health service (what the daemon uses), to check the vendored health.proto
    // talks to it.
    grpc::EnableDefaultHealthCheckService(true);
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    builder.RegisterService(&inference_);
    builder.RegisterService(&admin_);
    server_ = builder.BuildAndStart();
    ASSERT_NE(server_, nullptr);
    address_ = "127.0.0.1:" + std::to_string(port);
    auto channel = MakeChannel(address_, TlsFiles());
    ASSERT_TRUE(channel.ok()) << channel.status();
    command_ = CommandContext{.channel = *channel, .out = &out_, .err = &err_};
  }
  void TearDown() override {
    if (server_) server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
  }

  CommandContext Admin(std::string token) {
    CommandContext admin = command_;
    admin.bearer_token = std::move(token);
    return admin;
  }

  FakeInference inference_;
  FakeAdmin admin_;
  std::unique_ptr<grpc::Server> server_;
  std::string address_;
  std::ostringstream out_;
  std::ostringstream err_;
  CommandContext command_;
};

TEST_F(LoopbackTest, GenerateStreamsAndSendsTheRequest) {
  const auto request = BuildGenerateRequest(
      {.prompt_ids = "1,2,3", .routing = {.pin = "math", .show_routing = true}});
  ASSERT_TRUE(request.ok());
  EXPECT_EQ(RunGenerate(command_, *request, /*stream_text=*/false), kExitOk) << err_.str();
  EXPECT_EQ(out_.str(),
            "token 42  math=0.71 code=0.29\n"
            "token 7  math=0.50 code=0.50\n"
            "token 2  math=0.10 code=0.90\n"
            "finish=stop tokens=3 prompt=3 queue=0.1ms ttft=12.3ms total=40.1ms\n");
  EXPECT_EQ(err_.str(), "");
  const v1::GenerateRequest received = inference_.last_generate();
  EXPECT_THAT(received.prompt_token_ids(), ElementsAre(1, 2, 3));
  EXPECT_EQ(received.routing().pinned_expert(), "math");
  EXPECT_TRUE(received.return_routing());
}

TEST_F(LoopbackTest, GenerateJson) {
  command_.format = OutputFormat::kJson;
  const auto request = BuildGenerateRequest({.prompt_ids = "1"});
  ASSERT_TRUE(request.ok());
  EXPECT_EQ(RunGenerate(command_, *request, false), kExitOk);
  const std::vector<std::string> lines = absl::StrSplit(out_.str(), '\n', absl::SkipEmpty());
  ASSERT_EQ(lines.size(), 4u);
  EXPECT_EQ(json::parse(lines[3])["token_ids"], json::array({42, 7, 2}));
}

TEST_F(LoopbackTest, GenerateErrors) {
  v1::GenerateRequest empty;
  EXPECT_EQ(RunGenerate(command_, empty, false), kExitRejected);
  EXPECT_EQ(err_.str(), "error: INVALID_ARGUMENT: empty prompt\n");

  // A failure after some tokens: the token line is ended before the error.
  err_.str("");
  auto request = BuildGenerateRequest({.request_id = "fail_midway", .prompt_ids = "1"});
  EXPECT_EQ(RunGenerate(command_, *request, false), kExitUnavailable);
  EXPECT_EQ(out_.str(), "42\n");
  EXPECT_EQ(err_.str(), "error: UNAVAILABLE: shutting down\n");

  err_.str("");
  command_.timeout = absl::Milliseconds(100);
  request = BuildGenerateRequest({.request_id = "slow", .prompt_ids = "1"});
  EXPECT_EQ(RunGenerate(command_, *request, false), kExitDeadline);
  EXPECT_THAT(err_.str(), StartsWith("error: DEADLINE_EXCEEDED: "));
}

TEST_F(LoopbackTest, ScoreAndInfo) {
  const auto request = BuildScoreRequest({.ids = "4,5,6"});
  ASSERT_TRUE(request.ok());
  EXPECT_EQ(RunScore(command_, *request), kExitOk);
  EXPECT_THAT(out_.str(), HasSubstr("total_logprob=-1.7500 scored=2\n"));
  out_.str("");
  command_.format = OutputFormat::kJson;
  EXPECT_EQ(RunInfo(command_), kExitOk);
  EXPECT_EQ(json::parse(out_.str())["vocab_size"], 128);
}

TEST_F(LoopbackTest, AdminSendsTheBearerToken) {
  EXPECT_EQ(RunListExperts(Admin("")), kExitUnauthorized);
  EXPECT_EQ(err_.str(), "error: UNAUTHENTICATED: missing bearer token\n");
  EXPECT_EQ(RunListExperts(Admin("wrong")), kExitUnauthorized);

  out_.str("");
  EXPECT_EQ(RunListExperts(Admin(kToken)), kExitOk);
  EXPECT_THAT(out_.str(), HasSubstr("free slots: 3\n"));

  out_.str("");
  EXPECT_EQ(RunAttachExpert(Admin(kToken), "code", "/adapters/code"), kExitOk);
  EXPECT_THAT(out_.str(), StartsWith("attached expert code: slot 0, rank 16"));
  EXPECT_THAT(out_.str(), HasSubstr("from /adapters/code\n"));

  EXPECT_EQ(RunDetachExpert(Admin(kToken), "nope", false), kExitNotFound);
  EXPECT_EQ(RunDetachExpert(Admin(kToken), "math", false), kExitRejected);
  out_.str("");
  EXPECT_EQ(RunDetachExpert(Admin(kToken), "math", true), kExitOk);
  EXPECT_EQ(out_.str(), "detached expert math\n");

  EXPECT_EQ(RunSetDefaultRouter(Admin(kToken), ""), kExitOk);
  EXPECT_EQ(admin_.default_router(), "");
  // Not implemented by the fake: the generated base class answers UNIMPLEMENTED.
  EXPECT_EQ(RunListRouters(Admin(kToken)), kExitError);
}

TEST_F(LoopbackTest, HealthTalksToGrpcsHealthService) {
  EXPECT_EQ(RunHealth(command_, ""), kExitOk);
  EXPECT_EQ(out_.str(), "SERVING\n");
  // gRPC's service knows "" by itself; the daemon sets its services' status.
  server_->GetHealthCheckService()->SetServingStatus("moelora.v1.Inference", true);
  out_.str("");
  command_.format = OutputFormat::kJson;
  EXPECT_EQ(RunHealth(command_, "moelora.v1.Inference"), kExitOk);
  EXPECT_EQ(json::parse(out_.str())["status"], "SERVING");

  server_->GetHealthCheckService()->SetServingStatus("moelora.v1.Inference", false);
  out_.str("");
  EXPECT_EQ(RunHealth(command_, "moelora.v1.Inference"), kExitNotServing);
  EXPECT_EQ(json::parse(out_.str())["status"], "NOT_SERVING");
  EXPECT_EQ(RunHealth(command_, "no.such.Service"), kExitNotFound);
}

TEST(ChannelTest, NoServerIsUnavailable) {
  // A port nothing listens on: bind one, then close it.
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  ASSERT_GE(fd, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  socklen_t len = sizeof(addr);
  ASSERT_EQ(::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len), 0);
  const int port = ntohs(addr.sin_port);
  ::close(fd);
  auto channel = MakeChannel("127.0.0.1:" + std::to_string(port), TlsFiles());
  ASSERT_TRUE(channel.ok());
  std::ostringstream out, err;
  CommandContext command{.channel = *channel, .out = &out, .err = &err};
  EXPECT_EQ(RunInfo(command), kExitUnavailable);
  EXPECT_THAT(err.str(), StartsWith("error: UNAVAILABLE: "));
}

TEST(ChannelTest, TlsFileErrors) {
  EXPECT_EQ(MakeChannel("", TlsFiles()).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(MakeChannel("x:1", {.ca_file = "/nonexistent/ca.pem"}).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(MakeChannel("x:1", {.cert_file = "/nonexistent/cert.pem"}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ReadTokenFile("/nonexistent/token").status().code(), absl::StatusCode::kNotFound);
}

TEST(ChannelTest, ReadsTheTokenFile) {
  testing_support::ScopedTempDir dir("cli");
  std::ofstream(dir.Join("token")) << "  abc123\n";
  EXPECT_EQ(*ReadTokenFile(dir.Join("token")), "abc123");
  std::ofstream(dir.Join("empty")) << "\n";
  EXPECT_EQ(ReadTokenFile(dir.Join("empty")).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace moelora::cli
