#ifndef MOELORA_TESTS_TESTING_SERVER_PROCESS_H_
#define MOELORA_TESTS_TESTING_SERVER_PROCESS_H_

// The real moelora-server binary as a child process, for end-to-end tests.

#include <sys/types.h>

#include <string>
#include <vector>

#include "absl/status/status.h"

namespace moelora::testing_support {

// The whole file, or "" when it cannot be read.
std::string ReadFile(const std::string& path);

class ServerProcess {
 public:
  // The child's stdout and stderr go to `log_path`.
  explicit ServerProcess(std::string log_path) : log_path_(std::move(log_path)) {}
  // SIGKILLs and reaps the child if it still runs.
  ~ServerProcess();
  ServerProcess(const ServerProcess&) = delete;
  ServerProcess& operator=(const ServerProcess&) = delete;

  // Starts `binary` with `args` and waits up to 30 s for its "serving on port D, admin on port A"
  // line. FailedPrecondition (with the log) when the child exits first — exit_code() then holds
  // its status — and DeadlineExceeded when it never reports its ports.
  absl::Status Start(const std::string& binary, const std::vector<std::string>& args);

  int data_port() const { return data_port_; }
  int admin_port() const { return admin_port_; }
  pid_t pid() const { return pid_; }  // 0 once the child has been reaped
  int exit_code() const { return exit_code_; }
  std::string log() const { return ReadFile(log_path_); }

  // Waits up to 30 s for the child to exit: its exit code, or -1 (a signal, or still running).
  int Wait();

 private:
  // Reaps the child if it has exited; records its exit code.
  bool Reaped();

  const std::string log_path_;
  pid_t pid_ = 0;
  int data_port_ = 0;
  int admin_port_ = 0;
  int exit_code_ = -1;
};

}  // namespace moelora::testing_support

#endif  // MOELORA_TESTS_TESTING_SERVER_PROCESS_H_
