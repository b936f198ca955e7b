#include "server/metrics.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <map>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "prometheus/text_serializer.h"
#include "server/metrics_http.h"

namespace moelora {
namespace {

// metric family name + sorted label pairs -> value (counters, gauges; histogram _count/_sum).
std::map<std::string, double> Flatten(const std::vector<prometheus::MetricFamily>& families) {
  std::map<std::string, double> out;
  for (const auto& family : families) {
    for (const auto& metric : family.metric) {
      std::string key = family.name;
      for (const auto& label : metric.label) key += "|" + label.name + "=" + label.value;
      switch (family.type) {
        case prometheus::MetricType::Counter:
          out[key] = metric.counter.value;
          break;
        case prometheus::MetricType::Gauge:
          out[key] = metric.gauge.value;
          break;
        case prometheus::MetricType::Histogram:
          out[key + "|_count"] = static_cast<double>(metric.histogram.sample_count);
          out[key + "|_sum"] = metric.histogram.sample_sum;
          break;
        default:
          break;
      }
    }
  }
  return out;
}

TEST(MetricsTest, RoutingMassTopOneEntropyAndImbalance) {
  Metrics metrics;
  const std::vector<std::string> experts = {"math", "code"};
  // Prefill of 3 tokens through router r, then one pinned decode token.
  metrics.OnRouting("r", experts, {0.75f, 0.25f, 0.5f, 0.5f, 0.0f, 1.0f}, 3, true, 0.001);
  metrics.OnRouting("", experts, {1.0f, 0.0f}, 1, false, 0.0);
  // A base-model token routes nothing.
  metrics.OnRouting("", experts, {0.0f, 0.0f}, 1, false, 0.0);
  auto values = Flatten(metrics.Collect());
  EXPECT_DOUBLE_EQ(values["moelora_expert_routing_weight_total|expert=math"], 2.25);
  EXPECT_DOUBLE_EQ(values["moelora_expert_routing_weight_total|expert=code"], 1.75);
  // Ties go to the first expert.
  EXPECT_DOUBLE_EQ(values["moelora_expert_top1_selections_total|expert=math"], 3);
  EXPECT_DOUBLE_EQ(values["moelora_expert_top1_selections_total|expert=code"], 1);
  EXPECT_DOUBLE_EQ(values["moelora_routed_tokens_total|router=r"], 3);
  EXPECT_DOUBLE_EQ(values["moelora_routed_tokens_total|router=none"], 1);
  EXPECT_DOUBLE_EQ(values["moelora_router_requests_total|router=r"], 1);
  EXPECT_DOUBLE_EQ(values["moelora_routing_entropy_nats|_count"], 4);
  const double h = -(0.75 * std::log(0.75) + 0.25 * std::log(0.25)) + std::log(2.0);
  EXPECT_NEAR(values["moelora_routing_entropy_nats|_sum"], h, 1e-6);
  // Router r: math 1.25, code 1.75 of 3 -> 1.75/3 * 2.
  EXPECT_NEAR(metrics.LoadImbalance("r"), 1.75 / 3 * 2, 1e-9);
  EXPECT_NEAR(values["moelora_routing_load_imbalance|router=r"], 1.75 / 3 * 2, 1e-9);
  EXPECT_DOUBLE_EQ(metrics.LoadImbalance(""), 2.0);  // everything on one expert
}

TEST(MetricsTest, RequestsAndAdmin) {
  Metrics metrics;
  GenerateRequest request;
  GenerateEvent last;
  last.finished = true;
  last.finish_reason = FinishReason::kLength;
  last.usage = {.prompt_tokens = 4,
                .generated_tokens = 5,
                .queue_time = absl::Milliseconds(1),
                .time_to_first_token = absl::Milliseconds(10),
                .total_time = absl::Milliseconds(50)};
  metrics.OnRequestFinished(request, last);
  last.status = absl::CancelledError("x");
  metrics.OnRequestFinished(request, last);
  metrics.RecordRpc("Generate", "OK");
  metrics.RecordAttach(true, "", absl::Milliseconds(20));
  metrics.RecordAttach(false, "NOT_FOUND", absl::Milliseconds(1));
  metrics.RecordDetach(true, absl::Microseconds(50));
  metrics.OnStep(3, 12, absl::Milliseconds(4));
  auto values = Flatten(metrics.Collect());
  EXPECT_DOUBLE_EQ(values["moelora_prompt_tokens_total"], 8);
  EXPECT_DOUBLE_EQ(values["moelora_generated_tokens_total"], 10);
  EXPECT_DOUBLE_EQ(values["moelora_generate_finished_total|reason=length"], 1);
  EXPECT_DOUBLE_EQ(values["moelora_generate_finished_total|reason=cancelled"], 1);
  EXPECT_DOUBLE_EQ(values["moelora_time_to_first_token_seconds|_count"], 1);
  EXPECT_NEAR(values["moelora_time_per_output_token_seconds|_sum"], 0.010, 1e-9);
  EXPECT_DOUBLE_EQ(values["moelora_requests_total|code=OK|rpc=Generate"], 1);
  EXPECT_DOUBLE_EQ(values["moelora_expert_attaches_total|result=ok"], 1);
  EXPECT_DOUBLE_EQ(values["moelora_expert_load_failures_total|reason=NOT_FOUND"], 1);
  EXPECT_DOUBLE_EQ(values["moelora_expert_detaches_total"], 1);
  EXPECT_DOUBLE_EQ(values["moelora_batch_tokens|_sum"], 12);
  // Exported from the start, 0 until a GPU engine replays graphs.
  ASSERT_EQ(values.count("moelora_decode_graph_steps_total"), 1u);
  EXPECT_DOUBLE_EQ(values.at("moelora_decode_graph_captures_total"), 0);
  // The exposition is well formed text.
  const std::string text = prometheus::TextSerializer().Serialize(metrics.Collect());
  EXPECT_THAT(text, testing::HasSubstr("# TYPE moelora_requests_total counter"));
}

// One HTTP exchange with 127.0.0.1:port; returns the whole response.
std::string HttpGet(int port, const std::string& request_line) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(static_cast<uint16_t>(port));
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  EXPECT_EQ(connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)), 0);
  const std::string request = request_line + "\r\nHost: x\r\n\r\n";
  EXPECT_EQ(send(fd, request.data(), request.size(), 0), static_cast<ssize_t>(request.size()));
  std::string response;
  char buffer[4096];
  for (ssize_t n; (n = recv(fd, buffer, sizeof(buffer), 0)) > 0;) response.append(buffer, n);
  close(fd);
  return response;
}

TEST(MetricsHttpServerTest, ServesTheExpositionAtSlashMetricsOnly) {
  auto metrics = std::make_shared<Metrics>();
  metrics->RecordRpc("Score", "OK");
  auto server = MetricsHttpServer::Start("127.0.0.1:0", metrics);
  ASSERT_TRUE(server.ok()) << server.status();
  ASSERT_GT((*server)->port(), 0);
  const std::string ok = HttpGet((*server)->port(), "GET /metrics HTTP/1.1");
  EXPECT_THAT(ok, testing::StartsWith("HTTP/1.1 200 OK\r\n"));
  EXPECT_THAT(ok, testing::HasSubstr("text/plain; version=0.0.4"));
  EXPECT_THAT(ok, testing::HasSubstr("moelora_requests_total{code=\"OK\",rpc=\"Score\"} 1"));
  EXPECT_THAT(HttpGet((*server)->port(), "GET /other HTTP/1.1"),
              testing::StartsWith("HTTP/1.1 404"));
  EXPECT_THAT(HttpGet((*server)->port(), "POST /metrics HTTP/1.1"),
              testing::StartsWith("HTTP/1.1 405"));
  // The port is taken: a second server on it fails with a clear message.
  auto taken = MetricsHttpServer::Start(absl::StrCat("127.0.0.1:", (*server)->port()), metrics);
  ASSERT_FALSE(taken.ok());
  EXPECT_THAT(std::string(taken.status().message()), testing::HasSubstr("cannot listen"));
  EXPECT_FALSE(MetricsHttpServer::Start("no-port", metrics).ok());
}

}  // namespace
}  // namespace moelora
