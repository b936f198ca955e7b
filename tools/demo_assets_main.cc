// moelora-demo-assets: writes the built-in default (tiny llama, four LoRA experts, a router and
// the server's start-up manifest) that `make demo` serves. Does nothing when it is already there.

#include <iostream>
#include <string>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "core/demo_assets.h"

ABSL_FLAG(std::string, dir, "build/demo-assets", "directory to write the demo assets into");

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "Writes the built-in demo model, experts, router and manifest.json into --dir.");
  absl::ParseCommandLine(argc, argv);
  const std::string dir = absl::GetFlag(FLAGS_dir);
  const absl::Status status = moelora::WriteDemoAssets(dir);
  if (!status.ok()) {
    std::cerr << "error: " << status << "\n";
    return 1;
  }
  std::cout << dir << "/manifest.json\n";
  return 0;
}
