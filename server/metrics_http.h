#ifndef MOELORA_SERVER_METRICS_HTTP_H_
#define MOELORA_SERVER_METRICS_HTTP_H_

// Serves GET /metrics (Prometheus text format 0.0.4) from one Collectable on its own address.
//
// Why not prometheus-cpp's Exposer: Debian's civetweb starts its threads with a fixed 100 KiB
// stack, and glibc refuses (EINVAL) a stack smaller than the process's static TLS, which
// libtorch + gRPC exceed; in the daemon the Exposer fails with "Cannot create threads". This is
// the small part of it we need: one thread, one connection at a time, Connection: close.

#include <memory>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "prometheus/collectable.h"

namespace moelora {

class MetricsHttpServer {
 public:
  // `address` is host:port ("0.0.0.0:9090", "127.0.0.1:0", "[::]:9090"); port 0 picks a free
  // one (see port()).
  static absl::StatusOr<std::unique_ptr<MetricsHttpServer>> Start(
      const std::string& address, std::shared_ptr<prometheus::Collectable> collectable);
  ~MetricsHttpServer();  // stops the thread and closes the socket
  MetricsHttpServer(const MetricsHttpServer&) = delete;
  MetricsHttpServer& operator=(const MetricsHttpServer&) = delete;

  int port() const { return port_; }

 private:
  MetricsHttpServer() = default;
  void Serve();
  void HandleConnection(int fd);

  std::shared_ptr<prometheus::Collectable> collectable_;
  int listen_fd_ = -1;
  int wake_fds_[2] = {-1, -1};  // a pipe: writing to [1] ends Serve()
  int port_ = 0;
  std::thread thread_;
};

}  // namespace moelora

#endif  // MOELORA_SERVER_METRICS_HTTP_H_
