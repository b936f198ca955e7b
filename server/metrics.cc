#include "server/metrics.h"

#include <algorithm>
#include <cmath>
#include <utility>

#include "absl/time/clock.h"

namespace moelora {
namespace {

using prometheus::BuildCounter;
using prometheus::BuildGauge;
using prometheus::BuildHistogram;
using prometheus::Counter;
using prometheus::Family;
using prometheus::Gauge;
using prometheus::Histogram;
using prometheus::Registry;

// Exponential buckets: start, start*factor, ... (count of them).
Histogram::BucketBoundaries Exponential(double start, double factor, int count) {
  Histogram::BucketBoundaries buckets;
  for (int i = 0; i < count; ++i, start *= factor) buckets.push_back(start);
  return buckets;
}

const Histogram::BucketBoundaries& LatencyBuckets() {
  static const auto* const buckets = new Histogram::BucketBoundaries(Exponential(1e-3, 2, 16));
  return *buckets;  // 1 ms .. 33 s
}

Family<Counter>& Counters(Registry& registry, const std::string& name, const std::string& help) {
  return BuildCounter().Name(name).Help(help).Register(registry);
}
Family<Gauge>& Gauges(Registry& registry, const std::string& name, const std::string& help) {
  return BuildGauge().Name(name).Help(help).Register(registry);
}
Family<Histogram>& Histograms(Registry& registry, const std::string& name,
                              const std::string& help) {
  return BuildHistogram().Name(name).Help(help).Register(registry);
}

const std::string& RouterLabel(const std::string& router) {
  static const auto* const kNone = new std::string("none");
  return router.empty() ? *kNone : router;
}

}  // namespace

Metrics::Metrics(const MetricsOptions& options)
    : options_(options),
      registry_(std::make_shared<Registry>()),
      rpcs_(Counters(*registry_, "moelora_requests_total",
                     "RPCs finished, by method and gRPC status code.")),
      time_to_first_token_(Histograms(*registry_, "moelora_time_to_first_token_seconds",
                                      "Generate: arrival to first token.")
                               .Add({}, LatencyBuckets())),
      time_per_output_token_(Histograms(*registry_, "moelora_time_per_output_token_seconds",
                                        "Generate: mean time per token after the first.")
                                 .Add({}, Exponential(1e-4, 2, 16))),
      request_duration_(Histograms(*registry_, "moelora_request_duration_seconds",
                                   "Generate: arrival to last token (end to end).")
                            .Add({}, LatencyBuckets())),
      queue_time_(Histograms(*registry_, "moelora_request_queue_seconds",
                             "Generate: arrival to admission into the running batch.")
                      .Add({}, LatencyBuckets())),
      finished_(Counters(*registry_, "moelora_generate_finished_total",
                         "Generate requests that ended, by reason (length, stop, cancelled, "
                         "deadline_exceeded, unavailable, error).")),
      prompt_tokens_(
          Counters(*registry_, "moelora_prompt_tokens_total", "Prompt tokens processed.").Add({})),
      generated_tokens_(
          Counters(*registry_, "moelora_generated_tokens_total", "Tokens generated.").Add({})),
      queue_depth_(
          Gauges(*registry_, "moelora_queue_depth", "Requests waiting for admission.").Add({})),
      running_(
          Gauges(*registry_, "moelora_running_requests", "Requests in the running batch.").Add({})),
      batch_requests_(Histograms(*registry_, "moelora_batch_requests", "Requests per forward step.")
                          .Add({}, Exponential(1, 2, 9))),
      batch_tokens_(Histograms(*registry_, "moelora_batch_tokens", "New tokens per forward step.")
                        .Add({}, Exponential(1, 4, 9))),
      step_duration_(Histograms(*registry_, "moelora_step_duration_seconds",
                                "Wall time of one forward step (routing included).")
                         .Add({}, Exponential(1e-4, 2, 16))),
      graph_steps_(Counters(*registry_, "moelora_decode_graph_steps_total",
                            "Decode steps replayed from a CUDA graph.")
                       .Add({})),
      graph_captures_(Counters(*registry_, "moelora_decode_graph_captures_total",
                               "CUDA graphs captured for decode steps.")
                          .Add({})),
      kv_tokens_used_(
          Gauges(*registry_, "moelora_kv_cache_used_tokens", "Tokens held in the KV cache now.")
              .Add({})),
      kv_tokens_reserved_(Gauges(*registry_, "moelora_kv_cache_reserved_tokens",
                                 "Prompt + max_new_tokens of the running requests.")
                              .Add({})),
      kv_tokens_capacity_(Gauges(*registry_, "moelora_kv_cache_capacity_tokens",
                                 "KV cache size: slots x max_seq_len.")
                              .Add({})),
      kv_slots_used_(Gauges(*registry_, "moelora_kv_cache_used_slots",
                            "KV cache slots held by running requests.")
                         .Add({})),
      kv_slots_capacity_(Gauges(*registry_, "moelora_kv_cache_capacity_slots",
                                "KV cache slots (max running requests).")
                             .Add({})),
      expert_weight_mass_(Counters(*registry_, "moelora_expert_routing_weight_total",
                                   "Sum of each expert's routing weight over routed tokens.")),
      expert_top1_(Counters(*registry_, "moelora_expert_top1_selections_total",
                            "Tokens on which the expert had the largest routing weight.")),
      routing_entropy_(Histograms(*registry_, "moelora_routing_entropy_nats",
                                  "Entropy of each routed token's weights (normalised), nats.")
                           .Add({}, Histogram::BucketBoundaries{0.01, 0.05, 0.1, 0.25, 0.5, 0.75,
                                                                1.0, 1.5, 2.0, 2.5, 3.0, 4.0})),
      routed_tokens_(Counters(*registry_, "moelora_routed_tokens_total",
                              "Tokens routed, by router ('none': pinned, explicit weights or "
                              "base model).")),
      router_requests_(Counters(*registry_, "moelora_router_requests_total",
                                "Generate requests, by the router that routed them.")),
      routing_duration_(Histograms(*registry_, "moelora_routing_duration_seconds",
                                   "Routing time of one request in one step, by router.")),
      load_imbalance_(Gauges(*registry_, "moelora_routing_load_imbalance",
                             "Largest expert share of routing weight over the trailing window, "
                             "divided by the uniform share (1 = even, K = collapsed).")),
      pool_slots_(Gauges(*registry_, "moelora_expert_pool_slots", "Expert pool slots, by state.")),
      expert_bytes_(Gauges(*registry_, "moelora_expert_device_bytes",
                           "Device bytes of an attached expert's A and B.")),
      attaches_(Counters(*registry_, "moelora_expert_attaches_total",
                         "Expert attach operations, by result.")),
      detaches_(Counters(*registry_, "moelora_expert_detaches_total", "Experts detached.").Add({})),
      load_failures_(Counters(*registry_, "moelora_expert_load_failures_total",
                              "Failed expert attaches, by reason (status code).")),
      attach_duration_(Histograms(*registry_, "moelora_expert_attach_duration_seconds",
                                  "Time to load, validate and publish an expert.")
                           .Add({}, LatencyBuckets())),
      detach_duration_(Histograms(*registry_, "moelora_expert_detach_duration_seconds",
                                  "Time to detach an expert.")
                           .Add({}, Exponential(1e-5, 4, 10))),
      device_memory_(Gauges(*registry_, "moelora_device_memory_bytes",
                            "Device memory held, by component (weights, experts, kv_cache).")) {}

void Metrics::RecordRpc(const std::string& rpc, const std::string& code) {
  rpcs_.Add({{"rpc", rpc}, {"code", code}}).Increment();
}

void Metrics::RecordAttach(bool ok, const std::string& failure_reason, absl::Duration duration) {
  attaches_.Add({{"result", ok ? "ok" : "error"}}).Increment();
  if (ok) {
    attach_duration_.Observe(absl::ToDoubleSeconds(duration));
  } else {
    load_failures_.Add({{"reason", failure_reason}}).Increment();
  }
}

void Metrics::RecordDetach(bool ok, absl::Duration duration) {
  if (!ok) return;
  detaches_.Increment();
  detach_duration_.Observe(absl::ToDoubleSeconds(duration));
}

void Metrics::OnStep(int64_t requests, int64_t tokens, absl::Duration duration) {
  batch_requests_.Observe(static_cast<double>(requests));
  batch_tokens_.Observe(static_cast<double>(tokens));
  step_duration_.Observe(absl::ToDoubleSeconds(duration));
}

void Metrics::OnRouting(const std::string& router, const std::vector<std::string>& experts,
                        absl::Span<const float> weights, int64_t tokens, bool prefill,
                        double routing_seconds) {
  const std::string& label = RouterLabel(router);
  const size_t k = experts.size();
  std::vector<double> mass(k, 0.0);
  std::vector<int64_t> top1(k, 0);
  int64_t routed = 0;
  for (int64_t t = 0; t < tokens; ++t) {
    const float* row = weights.data() + t * k;
    double total = 0;
    size_t best = 0;
    for (size_t i = 0; i < k; ++i) {
      mass[i] += row[i];
      total += row[i];
      if (row[i] > row[best]) best = i;
    }
    if (total <= 0) continue;  // the base model: nothing routed
    ++routed;
    ++top1[best];
    double entropy = 0;
    for (size_t i = 0; i < k; ++i) {
      const double p = row[i] / total;
      if (p > 0) entropy -= p * std::log(p);
    }
    routing_entropy_.Observe(entropy);
  }
  {
    absl::MutexLock lock(&mu_);
    for (size_t i = 0; i < k; ++i) {
      if (mass[i] == 0 && top1[i] == 0) continue;
      expert_series_.insert(experts[i]);
      expert_weight_mass_.Add({{"expert", experts[i]}}).Increment(mass[i]);
      if (top1[i] > 0) {
        expert_top1_.Add({{"expert", experts[i]}}).Increment(static_cast<double>(top1[i]));
      }
    }
    if (routed > 0) {
      std::deque<WindowEntry>& window = windows_[label];
      window.push_back({absl::Now(), experts, mass});
      const absl::Time cutoff = absl::Now() - options_.imbalance_window;
      while (!window.empty() && window.front().time < cutoff) window.pop_front();
    }
  }
  if (routed > 0) routed_tokens_.Add({{"router", label}}).Increment(static_cast<double>(routed));
  if (prefill) {
    router_requests_.Add({{"router", label}}).Increment();
    routing_duration_.Add({{"router", label}}, Exponential(1e-5, 4, 10)).Observe(routing_seconds);
  }
}

void Metrics::OnRequestFinished(const GenerateRequest& request, const GenerateEvent& last) {
  const Usage& usage = last.usage;
  prompt_tokens_.Increment(static_cast<double>(usage.prompt_tokens));
  generated_tokens_.Increment(static_cast<double>(usage.generated_tokens));
  std::string reason;
  switch (last.status.code()) {
    case absl::StatusCode::kOk:
      reason = last.finish_reason == FinishReason::kStop ? "stop" : "length";
      break;
    case absl::StatusCode::kCancelled:
      reason = "cancelled";
      break;
    case absl::StatusCode::kDeadlineExceeded:
      reason = "deadline_exceeded";
      break;
    case absl::StatusCode::kUnavailable:
      reason = "unavailable";
      break;
    default:
      reason = "error";
  }
  finished_.Add({{"reason", reason}}).Increment();
  if (!last.status.ok()) return;
  queue_time_.Observe(absl::ToDoubleSeconds(usage.queue_time));
  request_duration_.Observe(absl::ToDoubleSeconds(usage.total_time));
  if (usage.generated_tokens > 0) {
    time_to_first_token_.Observe(absl::ToDoubleSeconds(usage.time_to_first_token));
  }
  if (usage.generated_tokens > 1) {
    time_per_output_token_.Observe(
        absl::ToDoubleSeconds(usage.total_time - usage.time_to_first_token) /
        static_cast<double>(usage.generated_tokens - 1));
  }
}

double Metrics::LoadImbalance(const std::string& router) const {
  absl::MutexLock lock(&mu_);
  return LoadImbalanceLocked(RouterLabel(router), absl::Now());
}

double Metrics::LoadImbalanceLocked(const std::string& router, absl::Time now) const {
  const auto it = windows_.find(router);
  if (it == windows_.end()) return 0;
  std::map<std::string, double> mass;
  size_t experts = 0;
  for (const WindowEntry& entry : it->second) {
    if (entry.time < now - options_.imbalance_window) continue;
    experts = std::max(experts, entry.experts.size());
    for (size_t i = 0; i < entry.experts.size(); ++i) mass[entry.experts[i]] += entry.mass[i];
  }
  double total = 0, largest = 0;
  for (const auto& [name, value] : mass) {
    total += value;
    largest = std::max(largest, value);
  }
  if (total <= 0 || experts == 0) return 0;
  return largest / total * static_cast<double>(experts);
}

void Metrics::RefreshGauges() const {
  {
    absl::MutexLock lock(&mu_);
    const absl::Time now = absl::Now();
    for (const auto& [router, window] : windows_) {
      load_imbalance_.Add({{"router", router}}).Set(LoadImbalanceLocked(router, now));
    }
  }
  if (engine_ == nullptr) return;
  const EngineStats stats = engine_->stats();
  queue_depth_.Set(static_cast<double>(stats.queued));
  running_.Set(static_cast<double>(stats.running));
  kv_tokens_used_.Set(static_cast<double>(stats.kv_tokens_used));
  kv_tokens_reserved_.Set(static_cast<double>(stats.kv_tokens_reserved));
  kv_tokens_capacity_.Set(static_cast<double>(stats.kv_tokens_total));
  kv_slots_used_.Set(static_cast<double>(stats.kv_slots_used));
  kv_slots_capacity_.Set(static_cast<double>(stats.kv_slots_total));
  // Counters only go up: add what the engine counted since the last scrape.
  graph_steps_.Increment(
      std::max(0.0, static_cast<double>(stats.graph_steps) - graph_steps_.Value()));
  graph_captures_.Increment(
      std::max(0.0, static_cast<double>(stats.graph_captures) - graph_captures_.Value()));

  const ExpertPool& pool = engine_->mixture().pool();
  const int64_t capacity = pool.options().capacity;
  const int64_t free = pool.free_slots();
  pool_slots_.Add({{"state", "used"}}).Set(static_cast<double>(capacity - free));
  pool_slots_.Add({{"state", "free"}}).Set(static_cast<double>(free));
  device_memory_.Add({{"component", "weights"}})
      .Set(static_cast<double>(engine_->model().parameter_bytes()));
  device_memory_.Add({{"component", "experts"}}).Set(static_cast<double>(pool.reserved_bytes()));
  device_memory_.Add({{"component", "kv_cache"}})
      .Set(static_cast<double>(engine_->kv_cache_bytes()));

  std::set<std::string> attached;
  for (const ExpertStatus& expert : engine_->ListExperts()) {
    attached.insert(expert.info.name);
    expert_bytes_.Add({{"expert", expert.info.name}})
        .Set(static_cast<double>(expert.info.device_bytes));
  }
  absl::MutexLock lock(&mu_);
  // An expert that is gone loses its series, so label values stay bounded.
  for (const std::string& name : attached) expert_series_.insert(name);
  for (auto it = expert_series_.begin(); it != expert_series_.end();) {
    if (attached.count(*it) > 0) {
      ++it;
      continue;
    }
    const prometheus::Labels labels = {{"expert", *it}};
    for (auto* family : {&expert_weight_mass_, &expert_top1_}) {
      if (family->Has(labels)) family->Remove(&family->Add(labels));
    }
    if (expert_bytes_.Has(labels)) expert_bytes_.Remove(&expert_bytes_.Add(labels));
    it = expert_series_.erase(it);
  }
}

std::vector<prometheus::MetricFamily> Metrics::Collect() const {
  RefreshGauges();
  return registry_->Collect();
}

}  // namespace moelora
