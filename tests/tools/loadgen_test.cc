// moelora-loadgen's library: the statistics helpers, and RunLoad against the real moelora-server
// binary (a child process on loopback ports, a tiny random model) with concurrent clients and
// attach/detach cycles of a random r=16 adapter.

#include "tools/loadgen/loadgen.h"

#include <gtest/gtest.h>

#include <chrono>
#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "core/random_model.h"
#include "tests/testing/server_process.h"
#include "tests/testing/temp_dir.h"

namespace moelora::loadgen {
namespace {

using std::chrono::milliseconds;

TEST(PercentileTest, InterpolatesBetweenClosestRanks) {
  EXPECT_EQ(Percentile({}, 50), 0);
  EXPECT_EQ(Percentile({7}, 99), 7);
  const std::vector<double> sorted = {1, 2, 3, 4};
  EXPECT_DOUBLE_EQ(Percentile(sorted, 0), 1);
  EXPECT_DOUBLE_EQ(Percentile(sorted, 50), 2.5);
  EXPECT_DOUBLE_EQ(Percentile(sorted, 90), 3.7);
  EXPECT_DOUBLE_EQ(Percentile(sorted, 100), 4);
}

TEST(SummarizeTest, SortsAndSummarises) {
  const Distribution d = Summarize({5, 1, 3, 2, 4});
  EXPECT_EQ(d.count, 5);
  EXPECT_DOUBLE_EQ(d.mean, 3);
  EXPECT_DOUBLE_EQ(d.p50, 3);
  EXPECT_DOUBLE_EQ(d.p90, 4.6);
  EXPECT_DOUBLE_EQ(d.max, 5);
  const Distribution empty = Summarize({});
  EXPECT_EQ(empty.count, 0);
  EXPECT_EQ(empty.max, 0);
}

TEST(OverlapsAnyTest, GapsAgainstWindows) {
  const Clock::time_point t0 = Clock::now();
  const std::vector<TimeWindow> windows = {{t0 + milliseconds(10), t0 + milliseconds(20)},
                                           {t0 + milliseconds(40), t0 + milliseconds(50)}};
  EXPECT_FALSE(OverlapsAny({}, t0, t0 + milliseconds(100)));
  EXPECT_FALSE(OverlapsAny(windows, t0, t0 + milliseconds(10)));
  EXPECT_TRUE(OverlapsAny(windows, t0, t0 + milliseconds(11)));
  EXPECT_TRUE(OverlapsAny(windows, t0 + milliseconds(12), t0 + milliseconds(15)));
  EXPECT_TRUE(OverlapsAny(windows, t0 + milliseconds(19), t0 + milliseconds(45)));
  EXPECT_FALSE(OverlapsAny(windows, t0 + milliseconds(20), t0 + milliseconds(40)));
  EXPECT_TRUE(OverlapsAny(windows, t0 + milliseconds(5), t0 + milliseconds(60)));
  EXPECT_FALSE(OverlapsAny(windows, t0 + milliseconds(50), t0 + milliseconds(60)));
}

constexpr char kToken[] = "loadgen-test-token";

// The real binary on a tiny llama, an admin token, and a random r=16 adapter to attach.
class LoadgenServerTest : public testing::Test {
 protected:
  void SetUp() override {
    const ModelConfig config = TinyModelConfig(ModelType::kLlama);
    ASSERT_TRUE(WriteRandomModel(temp_.Join("model"), config, {.seed = 3}).ok());
    ASSERT_TRUE(
        WriteRandomAdapter(temp_.Join("r16"), config, {.r = 16, .lora_alpha = 16, .seed = 7}).ok());
    std::ofstream(temp_.Join("token")) << kToken << "\n";
    StartServer();
  }

  // The binary with an admin token; both ports come from its "serving" line.
  void StartServer() {
    const absl::Status started =
        server_.Start(MOELORA_SERVER_BINARY,
                      {"--model_dir=" + temp_.Join("model"), "--device=cpu", "--listen=127.0.0.1:0",
                       "--admin_listen=127.0.0.1:0", "--admin_token_file=" + temp_.Join("token"),
                       "--log_requests=false"});
    ASSERT_TRUE(started.ok()) << started;
    port_ = server_.data_port();
    admin_port_ = server_.admin_port();
  }

  LoadOptions Options() const {
    LoadOptions options;
    options.address = absl::StrCat("127.0.0.1:", port_);
    options.admin_address = absl::StrCat("127.0.0.1:", admin_port_);
    options.admin_token = kToken;
    options.timeout = absl::Seconds(60);
    return options;
  }

  testing_support::ScopedTempDir temp_{"loadgen_test"};
  testing_support::ServerProcess server_{temp_.Join("stderr.log")};
  int port_ = 0;
  int admin_port_ = 0;
};

TEST_F(LoadgenServerTest, ConcurrentClientsWhileAttachingAnR16Expert) {
  LoadOptions options = Options();
  options.clients = 4;
  options.requests_per_client = 3;
  options.warmup_requests = 1;
  options.prompt_tokens = 12;
  options.max_tokens = 8;
  options.seed = 5;
  options.attach_dir = temp_.Join("r16");
  options.attach_cycles = 2;
  options.attach_interval = absl::Milliseconds(10);

  absl::StatusOr<LoadReport> report = RunLoad(options);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_EQ(report->model_type, "llama");
  EXPECT_EQ(report->vocab_size, 128);
  EXPECT_EQ(report->requests_failed, 0);
  EXPECT_TRUE(report->errors_by_code.empty());
  EXPECT_EQ(report->warmup_total, 4);
  EXPECT_EQ(report->warmup_failed, 0);
  EXPECT_EQ(report->requests_total, 12);
  EXPECT_EQ(report->requests_ok, 12);
  EXPECT_EQ(report->generated_tokens, 96);
  EXPECT_EQ(report->prompt_tokens, 144);
  EXPECT_EQ(report->failures(), 0);
  EXPECT_GT(report->wall_seconds, 0);
  EXPECT_NEAR(report->output_tokens_per_second, 96 / report->wall_seconds, 1e-6);
  EXPECT_NEAR(report->requests_per_second, 12 / report->wall_seconds, 1e-6);

  EXPECT_EQ(report->ttft_ms.count, 12);
  EXPECT_GT(report->ttft_ms.p50, 0);
  EXPECT_LE(report->ttft_ms.p50, report->ttft_ms.p90);
  EXPECT_LE(report->ttft_ms.p90, report->ttft_ms.p99);
  EXPECT_LE(report->ttft_ms.p99, report->ttft_ms.max);
  // 7 gaps after the first token of each request, one token per message or not.
  EXPECT_EQ(report->tpot_ms.count, 12 * 7);
  EXPECT_GT(report->tpot_ms.p50, 0);
  EXPECT_LE(report->tpot_ms.p50, report->tpot_ms.p90);
  EXPECT_EQ(report->e2e_ms.count, 12);
  EXPECT_GE(report->e2e_ms.p50, report->ttft_ms.p50);
  EXPECT_LE(report->gaps_during_attach_ms.count + report->gaps_outside_attach_ms.count, 12 * 7);

  EXPECT_EQ(report->attach_cycles, 2);
  EXPECT_EQ(report->attach_rank, 16);
  EXPECT_EQ(report->attach_failed, 0);
  EXPECT_EQ(report->detach_failed, 0);
  ASSERT_EQ(report->attach_ms_samples.size(), 2u);
  EXPECT_EQ(report->attach_ms.count, 2);
  EXPECT_GT(report->attach_ms.p50, 0);
  EXPECT_LE(report->attach_ms.p50, report->attach_ms.max);
  EXPECT_EQ(report->detach_ms.count, 2);

  const nlohmann::ordered_json json = ToJson(*report);
  EXPECT_EQ(json["requests"]["ok"], 12);
  EXPECT_EQ(json["tokens"]["generated"], 96);
  EXPECT_EQ(json["attach"]["attach_ms"]["count"], 2);
  EXPECT_EQ(json["attach"]["attach_ms_samples"].size(), 2u);
  EXPECT_EQ(json["config"]["routing"], nlohmann::ordered_json::object());
  for (const char* key : {"ttft_ms", "tpot_ms", "e2e_ms"}) {
    for (const char* stat : {"count", "mean", "p50", "p90", "p99", "max"}) {
      EXPECT_TRUE(json[key].contains(stat)) << key << "." << stat;
    }
  }
  EXPECT_TRUE(json["gaps"].contains("during_attach_ms"));
  EXPECT_TRUE(json["gaps"].contains("outside_attach_ms"));
  const std::string summary = FormatSummary(*report);
  EXPECT_NE(summary.find(absl::StrCat("server    127.0.0.1:", port_, ": llama on cpu")),
            std::string::npos)
      << summary;
  EXPECT_NE(summary.find("12 ok, 0 failed"), std::string::npos) << summary;
  EXPECT_NE(summary.find("96 generated"), std::string::npos) << summary;
  EXPECT_NE(summary.find("2 attach/detach cycles"), std::string::npos) << summary;
  EXPECT_NE(summary.find("(r=16)"), std::string::npos) << summary;
}

TEST_F(LoadgenServerTest, CountsFailedRequestsAndAdminCallsByCode) {
  LoadOptions options = Options();
  options.clients = 2;
  options.requests_per_client = 2;
  options.max_tokens = 2;
  options.routing.set_pinned_expert("nowhere");
  options.admin_token = "wrong";
  options.attach_dir = temp_.Join("r16");
  options.attach_cycles = 1;
  options.attach_interval = absl::ZeroDuration();

  absl::StatusOr<LoadReport> report = RunLoad(options);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_EQ(report->requests_total, 4);
  EXPECT_EQ(report->requests_failed, 4);
  EXPECT_EQ(report->errors_by_code, (std::map<std::string, int64_t>{{"NOT_FOUND", 4}}));
  EXPECT_EQ(report->generated_tokens, 0);
  EXPECT_EQ(report->ttft_ms.count, 0);
  EXPECT_EQ(report->attach_failed, 1);
  EXPECT_EQ(report->attach_errors_by_code,
            (std::map<std::string, int64_t>{{"UNAUTHENTICATED", 1}}));
  EXPECT_EQ(report->failures(), 5);
  EXPECT_NE(FormatSummary(*report).find("NOT_FOUND=4"), std::string::npos);
  EXPECT_EQ(ToJson(*report)["config"]["routing"],
            nlohmann::ordered_json({{"pinned_expert", "nowhere"}}));
}

TEST_F(LoadgenServerTest, RefusesAPromptThatCannotFit) {
  LoadOptions options = Options();
  options.prompt_tokens = 200;
  options.max_tokens = 100;  // the tiny model's max_seq_len is 256
  absl::StatusOr<LoadReport> report = RunLoad(options);
  EXPECT_EQ(report.status().code(), absl::StatusCode::kInvalidArgument) << report.status();
}

TEST(LoadgenTest, NoServerIsAnError) {
  LoadOptions options;
  options.address = "127.0.0.1:1";
  options.timeout = absl::Seconds(5);
  absl::StatusOr<LoadReport> report = RunLoad(options);
  EXPECT_EQ(report.status().code(), absl::StatusCode::kUnavailable) << report.status();
}

}  // namespace
}  // namespace moelora::loadgen
