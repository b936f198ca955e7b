#include "tests/testing/server_process.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <sstream>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace moelora::testing_support {
namespace {

constexpr int kPolls = 600;  // of 50 ms: 30 s
constexpr auto kPollInterval = std::chrono::milliseconds(50);

// The number right after `marker` in `text`, or 0.
int PortAfter(const std::string& text, const std::string& marker) {
  const size_t at = text.find(marker);
  if (at == std::string::npos) return 0;
  const size_t from = at + marker.size();
  const size_t end = text.find_first_not_of("0123456789", from);
  int port = 0;
  return absl::SimpleAtoi(text.substr(from, end == std::string::npos ? end : end - from), &port)
             ? port
             : 0;
}

}  // namespace

std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

ServerProcess::~ServerProcess() {
  if (pid_ > 0) {
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
  }
}

bool ServerProcess::Reaped() {
  int status = 0;
  if (waitpid(pid_, &status, WNOHANG) != pid_) return false;
  pid_ = 0;
  exit_code_ = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return true;
}

absl::Status ServerProcess::Start(const std::string& binary, const std::vector<std::string>& args) {
  std::vector<std::string> all = {binary};
  all.insert(all.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (std::string& arg : all) argv.push_back(arg.data());
  argv.push_back(nullptr);
  const int fd = open(log_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0) return absl::InternalError(absl::StrCat("cannot open ", log_path_));
  pid_ = fork();
  if (pid_ == 0) {
    dup2(fd, STDERR_FILENO);
    dup2(fd, STDOUT_FILENO);
    execv(argv[0], argv.data());
    _exit(127);
  }
  close(fd);
  for (int i = 0; i < kPolls; ++i) {
    const std::string text = log();
    // The whole line: "serving on port D, admin on port A[, metrics on port M]".
    const size_t at = text.find("serving on port ");
    const size_t end = at == std::string::npos ? at : text.find('\n', at);
    if (end != std::string::npos) {
      const std::string line = text.substr(at, end - at);
      data_port_ = PortAfter(line, "serving on port ");
      admin_port_ = PortAfter(line, ", admin on port ");
      return absl::OkStatus();
    }
    if (Reaped()) {
      return absl::FailedPreconditionError(
          absl::StrCat("moelora-server exited (", exit_code_, ") at start-up:\n", text));
    }
    std::this_thread::sleep_for(kPollInterval);
  }
  return absl::DeadlineExceededError(
      absl::StrCat("moelora-server did not report its ports:\n", log()));
}

int ServerProcess::Wait() {
  for (int i = 0; i < kPolls && pid_ > 0; ++i) {
    if (Reaped()) return exit_code_;
    std::this_thread::sleep_for(kPollInterval);
  }
  return pid_ > 0 ? -1 : exit_code_;
}

}  // namespace moelora::testing_support
