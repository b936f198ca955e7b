// moelora-server: the gRPC daemon. Flags become a ServerOptions (core and server/ read no
// flags); SIGTERM / SIGINT drain and exit 0. See server/README.md.
//
//   moelora-server --model_dir=/models/llama --experts=math=/ad/math,code=/ad/code
//       --routers=/r/mix --admin_token_file=/etc/moelora/token

#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "core/file_io.h"
#include "core/status_macros.h"
#include "server/request_log.h"
#include "server/sentencepiece_codec.h"
#include "server/server.h"

ABSL_FLAG(std::string, model_dir, "", "HF checkpoint directory (config.json + safetensors)");
ABSL_FLAG(std::string, device, "auto", "auto (cuda when available, else cpu), cpu, cuda or cuda:N");
ABSL_FLAG(std::string, dtype, "auto", "auto (bf16 on cuda, fp32 on cpu), fp32, bf16 or fp16");
ABSL_FLAG(std::string, experts, "", "start-up experts: name=dir[,name=dir...] (PEFT LoRA dirs)");
ABSL_FLAG(std::string, routers, "", "start-up router directories: dir[,dir...]");
ABSL_FLAG(std::string, default_router, "", "name of the router to make the default");
ABSL_FLAG(std::string, manifest, "",
          "JSON start-up manifest: {\"experts\": [{\"name\": ..., \"path\": ...}], "
          "\"routers\": [{\"path\": ..., \"default\": true}]} (adds to --experts / --routers)");
ABSL_FLAG(std::string, listen, "0.0.0.0:50051", "data port: Inference, health, reflection");
ABSL_FLAG(std::string, admin_listen, "127.0.0.1:50052", "admin port: Admin, health, reflection");
ABSL_FLAG(bool, admin_on_data_port, false, "serve Admin on the data port (no admin port)");
ABSL_FLAG(std::string, metrics_listen, "",
          "Prometheus /metrics address (HTTP), e.g. 0.0.0.0:9090; empty: no metrics");
ABSL_FLAG(int64_t, pool_capacity, 8, "expert pool slots");
ABSL_FLAG(int64_t, pool_max_rank, 64, "largest LoRA rank a slot holds");
ABSL_FLAG(std::string, wide_room_layout, "auto",
          "gate/up adapter room: columns (B beside W: cheapest dense prefill), rows (A below W: "
          "Bᵀ row-major for sparse top-k decode), auto (rows from 16 pool slots)");
ABSL_FLAG(int64_t, max_running_requests, 16, "requests generating at once (KV-cache slots)");
ABSL_FLAG(int64_t, max_seq_len, 0, "tokens per request, prompt + generated; 0: min(model's, 4096)");
ABSL_FLAG(int64_t, kv_cache_bytes, 0,
          "KV-cache budget in bytes; > 0 replaces --max_running_requests with what fits");
ABSL_FLAG(int64_t, max_batch_tokens, 4096, "new tokens per forward step; longer prompts refused");
ABSL_FLAG(int64_t, max_queued_requests, 64, "requests waiting; beyond: RESOURCE_EXHAUSTED");
ABSL_FLAG(bool, cuda_graphs, true,
          "decode steps through CUDA graphs on a GPU (captured per batch size and context bucket)");
ABSL_FLAG(absl::Duration, drain_timeout, absl::Seconds(30),
          "on SIGTERM / SIGINT: how long running requests may take to finish");
ABSL_FLAG(std::string, admin_token_file, "",
          "file holding the admin bearer token (metadata 'authorization: Bearer <token>')");
ABSL_FLAG(std::string, tls_cert_file, "", "PEM server certificate chain (TLS on both ports)");
ABSL_FLAG(std::string, tls_key_file, "", "PEM server private key");
ABSL_FLAG(std::string, tls_client_ca_file, "",
          "PEM CA bundle: require and verify client certificates (mutual TLS)");
ABSL_FLAG(int64_t, max_message_bytes, 16 << 20, "largest message received or sent");
ABSL_FLAG(std::string, tokenizer, "auto",
          "SentencePiece tokenizer.model for text requests: a file or directory; auto: "
          "<model_dir>/tokenizer.model when present; none: token ids only");
ABSL_FLAG(bool, add_bos, true, "prepend the tokenizer's BOS id to text prompts");
ABSL_FLAG(bool, log_requests, true, "one stderr line per finished request and admin call");

namespace {

using moelora::server::LogLine;

int signal_pipe[2] = {-1, -1};

// Async-signal-safe: one byte into the pipe.
void OnSignal(int signal) {
  const int saved_errno = errno;
  const char byte = static_cast<char>(signal);
  [[maybe_unused]] ssize_t written = write(signal_pipe[1], &byte, 1);
  errno = saved_errno;
}

// Blocks until a signal arrives; its number.
int ReadSignal() {
  char byte = 0;
  while (read(signal_pipe[0], &byte, 1) != 1) {
  }
  return byte;
}

absl::StatusOr<moelora::server::ServerOptions> OptionsFromFlags() {
  moelora::server::ServerOptions options;
  options.model_dir = absl::GetFlag(FLAGS_model_dir);
  if (options.model_dir.empty()) return absl::InvalidArgumentError("--model_dir is required");
  absl::StatusOr<moelora::LoadOptions> load =
      moelora::ParseLoadOptions(absl::GetFlag(FLAGS_device), absl::GetFlag(FLAGS_dtype));
  if (!load.ok()) return moelora::PrefixStatus(load.status(), "--device/--dtype: ");
  options.load = *load;
  absl::StatusOr<std::optional<moelora::RoomLayout>> wide_layout =
      moelora::ParseWideRoomLayout(absl::GetFlag(FLAGS_wide_room_layout));
  if (!wide_layout.ok()) return moelora::PrefixStatus(wide_layout.status(), "--wide_room_layout: ");
  options.load.adapter_room.wide_layout = *wide_layout;
  options.pool = {.capacity = absl::GetFlag(FLAGS_pool_capacity),
                  .max_rank = absl::GetFlag(FLAGS_pool_max_rank)};
  options.engine = {.max_running_requests = absl::GetFlag(FLAGS_max_running_requests),
                    .max_seq_len = absl::GetFlag(FLAGS_max_seq_len),
                    .max_batch_tokens = absl::GetFlag(FLAGS_max_batch_tokens),
                    .max_queued_requests = absl::GetFlag(FLAGS_max_queued_requests),
                    .cuda_graphs = absl::GetFlag(FLAGS_cuda_graphs)};
  options.kv_cache_bytes = absl::GetFlag(FLAGS_kv_cache_bytes);

  moelora::server::StartupManifest& startup = options.startup;
  if (!absl::GetFlag(FLAGS_manifest).empty()) {
    ASSIGN_OR_RETURN(startup, moelora::server::ReadManifest(absl::GetFlag(FLAGS_manifest)));
  }
  absl::StatusOr<std::vector<moelora::server::ExpertSpec>> experts =
      moelora::server::ParseExpertList(absl::GetFlag(FLAGS_experts));
  if (!experts.ok()) return moelora::PrefixStatus(experts.status(), "--experts: ");
  startup.experts.insert(startup.experts.end(), experts->begin(), experts->end());
  for (absl::string_view dir :
       absl::StrSplit(absl::GetFlag(FLAGS_routers), ',', absl::SkipWhitespace())) {
    startup.routers.push_back({.path = std::string(dir)});
  }
  startup.default_router = absl::GetFlag(FLAGS_default_router);

  options.listen = absl::GetFlag(FLAGS_listen);
  options.admin_listen = absl::GetFlag(FLAGS_admin_listen);
  options.admin_on_data_port = absl::GetFlag(FLAGS_admin_on_data_port);
  options.metrics_listen = absl::GetFlag(FLAGS_metrics_listen);
  options.max_message_bytes = absl::GetFlag(FLAGS_max_message_bytes);
  if (options.max_message_bytes <= 0) {
    return absl::InvalidArgumentError("--max_message_bytes must be > 0");
  }
  options.admin_token_file = absl::GetFlag(FLAGS_admin_token_file);
  options.tls = {.cert_file = absl::GetFlag(FLAGS_tls_cert_file),
                 .key_file = absl::GetFlag(FLAGS_tls_key_file),
                 .client_ca_file = absl::GetFlag(FLAGS_tls_client_ca_file)};
  options.log_requests = absl::GetFlag(FLAGS_log_requests);

  std::string tokenizer = absl::GetFlag(FLAGS_tokenizer);
  if (tokenizer == "auto") {
    const std::string candidate = options.model_dir + "/tokenizer.model";
    tokenizer = access(candidate.c_str(), R_OK) == 0 ? candidate : "none";
  }
  if (tokenizer != "none") {
    absl::StatusOr<std::shared_ptr<const moelora::server::TextCodec>> codec =
        moelora::server::LoadSentencePieceCodec(tokenizer, absl::GetFlag(FLAGS_add_bos));
    if (!codec.ok()) return moelora::PrefixStatus(codec.status(), "--tokenizer: ");
    options.codec = *std::move(codec);
  }
  return options;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "The moelora gRPC daemon: one base model, LoRA experts mixed in one pass.");
  absl::ParseCommandLine(argc, argv);

  // SIGTERM / SIGINT go through a self-pipe to the waiter thread below. (Blocking them and
  // sigwait-ing cannot work here: a library starts a thread before main, and a signal delivered
  // to it would take the default action and kill the process mid-drain.)
  if (pipe(signal_pipe) != 0) {
    LogLine('E', "moelora-server: cannot create the signal pipe");
    return 1;
  }
  struct sigaction action = {};
  action.sa_handler = OnSignal;
  sigemptyset(&action.sa_mask);
  action.sa_flags = SA_RESTART;
  sigaction(SIGTERM, &action, nullptr);
  sigaction(SIGINT, &action, nullptr);

  absl::StatusOr<moelora::server::ServerOptions> options = OptionsFromFlags();
  if (!options.ok()) {
    LogLine('E', absl::StrCat("moelora-server: ", options.status().ToString()));
    return 2;
  }
  absl::StatusOr<std::unique_ptr<moelora::server::Server>> server =
      moelora::server::Server::Start(*std::move(options));
  if (!server.ok()) {
    LogLine('E', absl::StrCat("moelora-server: start-up failed: ", server.status().ToString()));
    return 1;
  }

  // The first signal drains (on the main thread, below); a second one during the drain exits at
  // once.
  auto* stop = new absl::Notification;  // leaked: the waiter may still be in Notify at exit
  std::thread waiter([stop] {
    const int signal = ReadSignal();
    LogLine('I',
            absl::StrCat("received ", signal == SIGTERM ? "SIGTERM" : "SIGINT", ", shutting down"));
    stop->Notify();
    ReadSignal();
    LogLine('W', "second signal during the drain: exiting now");
    std::_Exit(1);
  });
  waiter.detach();

  stop->WaitForNotification();
  (*server)->Shutdown(absl::GetFlag(FLAGS_drain_timeout));
  server->reset();
  return 0;
}
