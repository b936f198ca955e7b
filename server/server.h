#ifndef MOELORA_SERVER_SERVER_H_
#define MOELORA_SERVER_SERVER_H_

// The daemon without its flags: loads the model, builds the expert pool, the mixture and the
// engine, and serves them over two gRPC ports.
//
//   data port  (listen):        moelora.v1.Inference, grpc.health.v1.Health, reflection
//   admin port (admin_listen):  moelora.v1.Admin, grpc.health.v1.Health, reflection
//                               (or Admin on the data port with admin_on_data_port)
//   metrics (metrics_listen):   Prometheus text format at /metrics (HTTP), when set
//
// Start-up: the model is loaded before the ports open; then the ports open with health
// NOT_SERVING (Inference and Admin answer UNAVAILABLE), the start-up experts and routers are
// attached, and health turns SERVING (overall "" and each service's name). Any failure stops
// the server and Start returns it, naming the expert or router and its path.
//
// Shutdown(drain): health NOT_SERVING, the engine refuses new requests and finishes the ones it
// has for up to `drain` (then ends the rest with UNAVAILABLE), then both gRPC servers shut down
// with a short deadline for the calls still open.

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "core/engine.h"
#include "core/expert_pool.h"
#include "core/mixture.h"
#include "core/model.h"
#include "server/auth.h"
#include "server/metrics.h"
#include "server/metrics_http.h"
#include "server/text_codec.h"

namespace grpc {
class Server;
}  // namespace grpc

namespace moelora::server {

class AdminService;
class InferenceService;

struct ExpertSpec {
  std::string name;
  std::string path;
};

struct RouterSpec {
  std::string path;
  bool make_default = false;
};

// What is attached before the server reports SERVING.
struct StartupManifest {
  std::vector<ExpertSpec> experts;
  std::vector<RouterSpec> routers;
  // A router name to make the default after attaching (empty: the engine's choice, or the
  // router marked make_default).
  std::string default_router;
};

// "name=dir,name=dir" (flag form).
absl::StatusOr<std::vector<ExpertSpec>> ParseExpertList(absl::string_view text);
// A JSON manifest: {"experts": [{"name": "math", "path": "/ad/math"}],
//                   "routers": [{"path": "/r/mix", "default": true}]}
// Relative paths are taken relative to the manifest's directory.
absl::StatusOr<StartupManifest> ParseManifest(absl::string_view json_text,
                                              const std::string& manifest_path);
absl::StatusOr<StartupManifest> ReadManifest(const std::string& path);

// gRPC keepalive and ping policy of both ports. The server pings an idle connection every
// `time_ms` and drops it when no answer comes within `timeout_ms`: a client that vanished
// without closing its stream is noticed, its request cancelled and its KV slot freed. Clients
// may ping as often as every `min_recv_ping_interval_ms` (also with no call open); more often
// gets the connection closed with ENHANCE_YOUR_CALM (gRPC's default allows one ping per 5
// minutes, too few for clients that keep long streams alive through proxies).
struct KeepaliveOptions {
  int time_ms = 30'000;                    // GRPC_ARG_KEEPALIVE_TIME_MS
  int timeout_ms = 10'000;                 // GRPC_ARG_KEEPALIVE_TIMEOUT_MS
  bool permit_without_calls = true;        // GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS
  int min_recv_ping_interval_ms = 10'000;  // GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS
  int max_pings_without_data = 0;          // GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA (0: no cap)
};

struct ServerOptions {
  std::string model_dir;
  LoadOptions load;  // its adapter_room's slots and rank are the pool's; wide_layout is kept
  ExpertPoolOptions pool;
  EngineOptions engine;
  // > 0: engine.max_running_requests = the sequences of max_seq_len tokens this many bytes of
  // KV cache hold.
  int64_t kv_cache_bytes = 0;
  StartupManifest startup;

  std::string listen = "0.0.0.0:50051";  // port 0: any free port (see data_port())
  std::string admin_listen = "127.0.0.1:50052";
  bool admin_on_data_port = false;
  int64_t max_message_bytes = 16 << 20;  // receive and send, both ports
  KeepaliveOptions keepalive;

  // A file holding the admin bearer token; empty: admin calls need no token (keep the admin
  // port on loopback, or use mutual TLS).
  std::string admin_token_file;
  TlsOptions tls;  // both ports

  // Prometheus /metrics on its own address (docs/metrics.md); empty: no metrics.
  std::string metrics_listen;

  std::shared_ptr<const TextCodec> codec;  // optional tokenizer
  bool log_requests = true;                // request and admin log lines on stderr
};

// The KV-cache slots `bytes` hold for sequences of `max_seq_len` tokens of `config` in `dtype`.
// InvalidArgument when not even one fits.
absl::StatusOr<int64_t> RunningRequestsForKvBytes(const ModelConfig& config, at::ScalarType dtype,
                                                  int64_t max_seq_len, int64_t bytes);

class Server {
 public:
  static absl::StatusOr<std::unique_ptr<Server>> Start(ServerOptions options);
  // Shuts down (with no drain) when Shutdown was not called.
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // The bound ports (the chosen ones when the addresses asked for port 0). admin_port() is
  // data_port() with admin_on_data_port.
  int data_port() const { return data_port_; }
  int admin_port() const { return admin_port_; }
  // The metrics port, 0 without metrics_listen.
  int metrics_port() const { return metrics_port_; }

  // See the file comment. Safe from any thread; later calls wait for the first to finish.
  // Returns true when every request finished within the drain timeout.
  bool Shutdown(absl::Duration drain_timeout);
  // Blocks until Shutdown has finished.
  void Wait();

  Engine& engine() { return *engine_; }
  const Model& model() const { return *model_; }

 private:
  explicit Server(ServerOptions options);
  absl::Status Init();
  absl::Status StartPorts();
  absl::Status AttachStartup();
  void SetServing(bool serving);
  void StopPorts(absl::Duration grace);

  const ServerOptions options_;
  std::unique_ptr<Model> model_;
  std::unique_ptr<ExpertPool> pool_;
  std::unique_ptr<Mixture> mixture_;
  // Before the engine (its observer, destroyed after it); the exposer after (scrapes read the
  // engine, so it stops first).
  std::shared_ptr<Metrics> metrics_;
  std::unique_ptr<Engine> engine_;
  std::unique_ptr<MetricsHttpServer> exposer_;
  std::unique_ptr<InferenceService> inference_;
  std::unique_ptr<AdminService> admin_;
  // The admin token, when a TLS admin port's processor checks it.
  std::shared_ptr<const BearerTokenChecker> admin_checker_;
  std::unique_ptr<grpc::Server> data_server_;
  std::unique_ptr<grpc::Server> admin_server_;
  int data_port_ = 0;
  int admin_port_ = 0;
  int metrics_port_ = 0;

  absl::Mutex shutdown_mu_;
  bool shut_down_ ABSL_GUARDED_BY(shutdown_mu_) = false;
  bool drained_ ABSL_GUARDED_BY(shutdown_mu_) = false;
  absl::Notification stopped_;
};

}  // namespace moelora::server

#endif  // MOELORA_SERVER_SERVER_H_
