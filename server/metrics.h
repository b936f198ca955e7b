#ifndef MOELORA_SERVER_METRICS_H_
#define MOELORA_SERVER_METRICS_H_

// Prometheus metrics for the daemon (names, types and labels are documented in docs/metrics.md).
// `Metrics` observes the engine (EngineObserver, called on the compute thread), is told about
// RPC outcomes and admin operations by the services, and reads gauges (queue, KV cache, pool,
// memory) from the engine when scraped. Label values are bounded: experts and routers are
// operator-named, and an expert's series go away when it is no longer attached.

#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "core/engine.h"
#include "prometheus/collectable.h"
#include "prometheus/counter.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"

namespace moelora {

struct MetricsOptions {
  // Routing load imbalance is computed over this trailing window.
  absl::Duration imbalance_window = absl::Minutes(1);
};

class Metrics : public EngineObserver, public prometheus::Collectable {
 public:
  explicit Metrics(const MetricsOptions& options = {});

  // The engine to read gauges from at scrape time; set once, before serving.
  void set_engine(const Engine* engine) { engine_ = engine; }

  // --- from the services ---
  // Every finished RPC, by method name ("Generate", "AttachExpert", ...) and gRPC code name.
  void RecordRpc(const std::string& rpc, const std::string& code);
  // Admin: an attach that succeeded or failed (reason = the status code name), its duration.
  void RecordAttach(bool ok, const std::string& failure_reason, absl::Duration duration);
  void RecordDetach(bool ok, absl::Duration duration);

  // --- EngineObserver (compute thread) ---
  void OnStep(int64_t requests, int64_t tokens, absl::Duration duration) override;
  void OnRouting(const std::string& router, const std::vector<std::string>& experts,
                 absl::Span<const float> weights, int64_t tokens, bool prefill,
                 double routing_seconds) override;
  void OnRequestFinished(const GenerateRequest& request, const GenerateEvent& last) override;

  // --- prometheus::Collectable: refresh gauges, then everything in the registry ---
  std::vector<prometheus::MetricFamily> Collect() const override;

  // The current routing load imbalance of `router` (max expert share / uniform share over the
  // window; 1 = perfectly even, K = everything on one expert); 0 when it routed nothing.
  double LoadImbalance(const std::string& router) const;

 private:
  struct WindowEntry {
    absl::Time time;
    std::vector<std::string> experts;
    std::vector<double> mass;  // per expert, summed over the entry's tokens
  };

  void RefreshGauges() const;
  double LoadImbalanceLocked(const std::string& router, absl::Time now) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const MetricsOptions options_;
  const Engine* engine_ = nullptr;
  std::shared_ptr<prometheus::Registry> registry_;

  // Requests.
  prometheus::Family<prometheus::Counter>& rpcs_;
  prometheus::Histogram& time_to_first_token_;
  prometheus::Histogram& time_per_output_token_;
  prometheus::Histogram& request_duration_;
  prometheus::Histogram& queue_time_;
  prometheus::Family<prometheus::Counter>& finished_;
  prometheus::Counter& prompt_tokens_;
  prometheus::Counter& generated_tokens_;
  prometheus::Gauge& queue_depth_;
  prometheus::Gauge& running_;
  // Steps.
  prometheus::Histogram& batch_requests_;
  prometheus::Histogram& batch_tokens_;
  prometheus::Histogram& step_duration_;
  // Decode steps replayed from CUDA graphs, and graphs captured (synced from EngineStats).
  prometheus::Counter& graph_steps_;
  prometheus::Counter& graph_captures_;
  // KV cache.
  prometheus::Gauge& kv_tokens_used_;
  prometheus::Gauge& kv_tokens_reserved_;
  prometheus::Gauge& kv_tokens_capacity_;
  prometheus::Gauge& kv_slots_used_;
  prometheus::Gauge& kv_slots_capacity_;
  // Routing.
  prometheus::Family<prometheus::Counter>& expert_weight_mass_;
  prometheus::Family<prometheus::Counter>& expert_top1_;
  prometheus::Histogram& routing_entropy_;
  prometheus::Family<prometheus::Counter>& routed_tokens_;
  prometheus::Family<prometheus::Counter>& router_requests_;
  prometheus::Family<prometheus::Histogram>& routing_duration_;
  prometheus::Family<prometheus::Gauge>& load_imbalance_;
  // Pool and memory.
  prometheus::Family<prometheus::Gauge>& pool_slots_;
  prometheus::Family<prometheus::Gauge>& expert_bytes_;
  prometheus::Family<prometheus::Counter>& attaches_;
  prometheus::Counter& detaches_;
  prometheus::Family<prometheus::Counter>& load_failures_;
  prometheus::Histogram& attach_duration_;
  prometheus::Histogram& detach_duration_;
  prometheus::Family<prometheus::Gauge>& device_memory_;

  mutable absl::Mutex mu_;
  std::map<std::string, std::deque<WindowEntry>> windows_ ABSL_GUARDED_BY(mu_);  // by router
  mutable std::set<std::string> expert_series_ ABSL_GUARDED_BY(mu_);  // experts with series
};

}  // namespace moelora

#endif  // MOELORA_SERVER_METRICS_H_
