#include "core/router.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <exception>
#include <filesystem>
#include <fstream>
#include <limits>
#include <set>
#include <sstream>
#include <system_error>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/checkpoint.h"
#include "core/file_io.h"
#include "core/json_fields.h"
#include "core/status_macros.h"
#include "nlohmann/json.hpp"

namespace moelora {
namespace {

using json_fields::FieldError;

using Json = nlohmann::json;

constexpr char kConfigFile[] = "router_config.json";
constexpr char kWeightsFile[] = "router.safetensors";
constexpr char kGateWeight[] = "gate.weight";
constexpr char kGateBias[] = "gate.bias";

std::string JoinPath(const std::string& dir, absl::string_view file) {
  return (std::filesystem::path(dir) / std::string(file)).string();
}

absl::string_view InputName(RouterInput input) {
  switch (input) {
    case RouterInput::kEmbeddings:
      return "embeddings";
    case RouterInput::kBaseHidden:
      return "base_hidden";
  }
  return "unknown";
}

absl::string_view GranularityName(RoutingGranularity granularity) {
  switch (granularity) {
    case RoutingGranularity::kToken:
      return "token";
    case RoutingGranularity::kSequence:
      return "sequence";
  }
  return "unknown";
}

// A string field with a closed set of values; `fallback` when absent or null.
absl::StatusOr<std::string> EnumField(const Json& json, absl::string_view label, const char* field,
                                      const std::vector<std::string>& allowed,
                                      const std::string& fallback) {
  auto it = json.find(field);
  if (it == json.end() || it->is_null()) return fallback;
  const std::string expected = absl::StrCat("\"", absl::StrJoin(allowed, "\" or \""), "\"");
  if (!it->is_string()) return FieldError(label, field, absl::StrCat("must be ", expected));
  std::string value = it->get<std::string>();
  for (const std::string& candidate : allowed) {
    if (value == candidate) return value;
  }
  return FieldError(label, field, absl::StrCat("is '", value, "', expected ", expected));
}

// Everything a RouterConfig must satisfy, however it was made (parsed or built in code).
absl::Status ValidateConfig(const RouterConfig& config, absl::string_view label) {
  if (config.name.empty()) return FieldError(label, "name", "must be a non-empty string");
  if (config.experts.empty()) {
    return FieldError(label, "experts", "must be a non-empty list of expert names");
  }
  std::set<std::string> seen;
  for (const std::string& expert : config.experts) {
    if (expert.empty()) return FieldError(label, "experts", "contains an empty name");
    if (!seen.insert(expert).second) {
      return FieldError(label, "experts", absl::StrCat("lists '", expert, "' more than once"));
    }
  }
  const int64_t num_experts = static_cast<int64_t>(config.experts.size());
  if (config.top_k < 0 || config.top_k > num_experts) {
    return FieldError(label, "top_k",
                      absl::StrCat("must be between 0 (dense) and the ", num_experts,
                                   " experts, got ", config.top_k));
  }
  if (!std::isfinite(config.temperature) || !(config.temperature > 0)) {
    return FieldError(label, "temperature",
                      absl::StrCat("must be finite and > 0, got ", config.temperature));
  }
  if (config.input == RouterInput::kBaseHidden &&
      config.granularity != RoutingGranularity::kSequence) {
    return absl::InvalidArgumentError(absl::StrCat(
        label,
        ": field 'input' \"base_hidden\" requires field 'granularity' \"sequence\" (the base "
        "model's final hidden state routes once per prompt), got granularity \"",
        GranularityName(config.granularity), "\""));
  }
  return absl::OkStatus();
}

bool AllFinite(const at::Tensor& tensor) { return at::isfinite(tensor).all().item<bool>(); }

// Checks one gate tensor's shape, dtype and values; `expected` is its required shape.
absl::Status CheckGateTensor(const at::Tensor& tensor, absl::string_view label,
                             absl::string_view name, at::IntArrayRef expected) {
  if (!tensor.defined())
    return absl::InvalidArgumentError(absl::StrCat(label, ": ", name, " is undefined"));
  if (tensor.sizes() != expected) {
    return absl::InvalidArgumentError(absl::StrCat(label, ": ", name, " has shape ",
                                                   ShapeString(tensor.sizes()), ", expected ",
                                                   ShapeString(expected)));
  }
  if (!at::isFloatingType(tensor.scalar_type())) {
    return absl::InvalidArgumentError(absl::StrCat(label, ": ", name, " has dtype ",
                                                   c10::toString(tensor.scalar_type()),
                                                   ", expected a floating dtype"));
  }
  if (!AllFinite(tensor.detach())) {
    return absl::InvalidArgumentError(
        absl::StrCat(label, ": ", name, " holds non-finite values (NaN or infinity)"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<RouterConfig> RouterConfig::FromJson(absl::string_view json_text,
                                                    absl::string_view label) {
  const Json json = Json::parse(json_text.begin(), json_text.end(), /*cb=*/nullptr,
                                /*allow_exceptions=*/false);
  if (json.is_discarded()) {
    return absl::InvalidArgumentError(absl::StrCat(label, ": not valid JSON"));
  }
  if (!json.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(label, ": expected a JSON object"));
  }
  RouterConfig config;

  auto name = json.find("name");
  if (name == json.end() || !name->is_string() || name->get<std::string>().empty()) {
    return FieldError(label, "name", "must be a non-empty string");
  }
  config.name = name->get<std::string>();

  auto experts = json.find("experts");
  if (experts == json.end() || !experts->is_array() || experts->empty()) {
    return FieldError(label, "experts", "must be a non-empty list of expert names");
  }
  for (const Json& expert : *experts) {
    if (!expert.is_string()) {
      return FieldError(label, "experts", absl::StrCat("must hold strings, got ", expert.dump()));
    }
    config.experts.push_back(expert.get<std::string>());
  }

  ASSIGN_OR_RETURN(const std::string input,
                   EnumField(json, label, "input", {"embeddings", "base_hidden"}, "embeddings"));
  config.input = input == "base_hidden" ? RouterInput::kBaseHidden : RouterInput::kEmbeddings;
  ASSIGN_OR_RETURN(const std::string granularity,
                   EnumField(json, label, "granularity", {"token", "sequence"}, "token"));
  config.granularity =
      granularity == "sequence" ? RoutingGranularity::kSequence : RoutingGranularity::kToken;

  if (auto it = json.find("top_k"); it != json.end() && !it->is_null()) {
    if (!it->is_number_integer()) {
      return FieldError(label, "top_k", absl::StrCat("must be an integer, got ", it->dump()));
    }
    if (it->is_number_unsigned()) {
      const uint64_t value = it->get<uint64_t>();
      if (value > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        return FieldError(label, "top_k", absl::StrCat("is out of range, got ", value));
      }
    }
    config.top_k = it->get<int64_t>();
  }
  if (auto it = json.find("temperature"); it != json.end() && !it->is_null()) {
    if (!it->is_number()) {
      return FieldError(label, "temperature", absl::StrCat("must be a number, got ", it->dump()));
    }
    config.temperature = it->get<double>();
  }
  RETURN_IF_ERROR(ValidateConfig(config, label));
  return config;
}

std::string RouterConfig::ToJson() const {
  const Json json = {
      {"name", name},
      {"experts", experts},
      {"input", std::string(InputName(input))},
      {"granularity", std::string(GranularityName(granularity))},
      {"top_k", top_k},
      {"temperature", temperature},
  };
  return json.dump(2);
}

absl::Status ValidateNormalization(const RoutingNormalization& normalization, int64_t num_experts) {
  if (num_experts <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("routing needs at least one expert, got ", num_experts));
  }
  if (!std::isfinite(normalization.temperature) || !(normalization.temperature > 0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("temperature must be finite and > 0, got ", normalization.temperature));
  }
  if (normalization.top_k < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("top_k must be >= 0 (0 = dense), got ", normalization.top_k));
  }
  if (normalization.top_k > num_experts) {
    return absl::InvalidArgumentError(
        absl::StrCat("top_k ", normalization.top_k, " exceeds the ", num_experts, " experts"));
  }
  const at::Tensor& allowed = normalization.allowed;
  if (!allowed.defined()) return absl::OkStatus();
  if (allowed.scalar_type() != at::kBool && allowed.scalar_type() != at::kByte) {
    return absl::InvalidArgumentError(absl::StrCat("expert mask must be bool or uint8, got ",
                                                   c10::toString(allowed.scalar_type())));
  }
  if (allowed.dim() != 1 || allowed.size(0) != num_experts) {
    return absl::InvalidArgumentError(absl::StrCat("expert mask has shape ",
                                                   ShapeString(allowed.sizes()), ", expected [",
                                                   num_experts, "] (one entry per expert)"));
  }
  try {
    if (!allowed.ne(0).any().item<bool>()) {
      return absl::InvalidArgumentError("expert mask allows no expert");
    }
  } catch (const c10::Error& e) {
    return absl::InvalidArgumentError(absl::StrCat("expert mask: ", e.what_without_backtrace()));
  }
  return absl::OkStatus();
}

at::Tensor NormalizeRouting(const at::Tensor& logits, const RoutingNormalization& normalization) {
  TORCH_CHECK(logits.defined() && logits.dim() == 2, "routing logits must be [n, K], got ",
              logits.defined() ? logits.sizes() : at::IntArrayRef{});
  const int64_t num_experts = logits.size(1);
  TORCH_CHECK(num_experts > 0, "routing logits have no expert column");
  TORCH_CHECK(std::isfinite(normalization.temperature) && normalization.temperature > 0,
              "temperature must be finite and > 0, got ", normalization.temperature);
  TORCH_CHECK(normalization.top_k >= 0, "top_k must be >= 0, got ", normalization.top_k);
  const double neg_inf = -std::numeric_limits<double>::infinity();

  at::Tensor scaled = logits.to(at::kFloat) / normalization.temperature;
  at::Tensor allowed;  // [1, K] bool on the logits' device, or undefined
  if (normalization.allowed.defined()) {
    TORCH_CHECK(normalization.allowed.numel() == num_experts, "expert mask has ",
                normalization.allowed.numel(), " entries for ", num_experts, " experts");
    allowed = normalization.allowed.to(scaled.device()).ne(0).reshape({1, num_experts});
    // Masked experts leave the competition before anything else: weight 0, no top-k place.
    scaled = scaled.masked_fill(allowed.logical_not(), neg_inf);
  }
  if (normalization.top_k > 0 && normalization.top_k < num_experts) {
    // Masked logits are -inf already, so the k largest are allowed ones whenever k allowed
    // experts exist; the mask is applied again so that fewer allowed experts keep only those.
    const at::Tensor indices =
        std::get<1>(scaled.detach().topk(normalization.top_k, /*dim=*/1, /*largest=*/true,
                                         /*sorted=*/false));
    at::Tensor keep = at::zeros_like(scaled, scaled.options().dtype(at::kBool));
    keep.scatter_(1, indices, true);
    if (allowed.defined()) keep = keep.logical_and(allowed);
    scaled = scaled.masked_fill(keep.logical_not(), neg_inf);
  }
  // Entries at -inf come out as exact zeros with zero gradient; validation guarantees each row
  // keeps at least one finite entry.
  return at::softmax(scaled, /*dim=*/1);
}

absl::StatusOr<std::shared_ptr<const Router>> Router::Load(const std::string& dir,
                                                           int64_t hidden_size) {
  if (hidden_size <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("router ", dir, ": hidden_size must be positive, got ", hidden_size));
  }
  const std::string config_path = JoinPath(dir, kConfigFile);
  const std::string weights_path = JoinPath(dir, kWeightsFile);
  ASSIGN_OR_RETURN(const std::string config_text, ReadFileToString(config_path, "router config"));
  ASSIGN_OR_RETURN(RouterConfig config, RouterConfig::FromJson(config_text, config_path));

  std::error_code error;
  if (!std::filesystem::is_regular_file(weights_path, error)) {
    return absl::NotFoundError(absl::StrCat(weights_path, ": router weights not found"));
  }
  ASSIGN_OR_RETURN(const Checkpoint checkpoint, Checkpoint::OpenFile(weights_path));
  for (const std::string& name : checkpoint.Names()) {
    if (name != kGateWeight && name != kGateBias) {
      return absl::InvalidArgumentError(absl::StrCat(weights_path, ": unexpected tensor '", name,
                                                     "' (a router holds only ", kGateWeight,
                                                     " and ", kGateBias, ")"));
    }
  }
  const int64_t num_experts = static_cast<int64_t>(config.experts.size());
  ASSIGN_OR_RETURN(at::Tensor weight, checkpoint.Get(kGateWeight, {num_experts, hidden_size}));
  ASSIGN_OR_RETURN(at::Tensor bias, checkpoint.Get(kGateBias, {num_experts}));
  for (const auto& [name, tensor] :
       {std::pair{kGateWeight, &weight}, std::pair{kGateBias, &bias}}) {
    if (!at::isFloatingType(tensor->scalar_type())) {
      return absl::InvalidArgumentError(
          absl::StrCat(weights_path, ": tensor '", name, "' has dtype ",
                       c10::toString(tensor->scalar_type()), ", expected a floating dtype"));
    }
  }
  try {
    weight = weight.to(at::kFloat).contiguous();
    bias = bias.to(at::kFloat).contiguous();
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat(weights_path, ": ", e.what_without_backtrace()));
  }
  absl::StatusOr<std::shared_ptr<const Router>> router =
      Create(std::move(config), std::move(weight), std::move(bias));
  if (!router.ok()) return PrefixStatus(router.status(), absl::StrCat(weights_path, ": "));
  return router;
}

absl::StatusOr<std::shared_ptr<const Router>> Router::Create(RouterConfig config,
                                                             at::Tensor gate_weight,
                                                             at::Tensor gate_bias) {
  const std::string label = absl::StrCat("router '", config.name, "'");
  RETURN_IF_ERROR(ValidateConfig(config, label));
  const int64_t num_experts = static_cast<int64_t>(config.experts.size());
  try {
    if (!gate_weight.defined() || gate_weight.dim() != 2 || gate_weight.size(1) <= 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          label, ": gate.weight must be [", num_experts, ", hidden] with hidden > 0, got ",
          gate_weight.defined() ? ShapeString(gate_weight.sizes()) : "undefined"));
    }
    const int64_t hidden_size = gate_weight.size(1);
    RETURN_IF_ERROR(CheckGateTensor(gate_weight, label, kGateWeight, {num_experts, hidden_size}));
    RETURN_IF_ERROR(CheckGateTensor(gate_bias, label, kGateBias, {num_experts}));
    if (gate_weight.device() != gate_bias.device()) {
      return absl::InvalidArgumentError(
          absl::StrCat(label, ": gate.weight is on ", gate_weight.device().str(),
                       " but gate.bias is on ", gate_bias.device().str()));
    }
    auto router = std::make_shared<Router>();
    router->config_ = std::move(config);
    // fp32 tensors are kept as given (shared storage, autograd identity); others are converted.
    router->gate_weight_ =
        gate_weight.scalar_type() == at::kFloat ? gate_weight : gate_weight.to(at::kFloat);
    router->gate_bias_ =
        gate_bias.scalar_type() == at::kFloat ? gate_bias : gate_bias.to(at::kFloat);
    return std::shared_ptr<const Router>(std::move(router));
  } catch (const c10::Error& e) {
    return absl::InvalidArgumentError(absl::StrCat(label, ": ", e.what_without_backtrace()));
  }
}

at::Tensor Router::Logits(const at::Tensor& features) const {
  TORCH_CHECK(features.defined() && features.dim() == 2 && features.size(1) == gate_weight_.size(1),
              "router '", config_.name, "': features must be [n, ", gate_weight_.size(1), "], got ",
              features.defined() ? features.sizes() : at::IntArrayRef{});
  const at::Tensor x = features.to(at::kFloat);
  if (x.device() == gate_weight_.device()) return at::linear(x, gate_weight_, gate_bias_);
  return at::linear(x, gate_weight_.to(x.device()), gate_bias_.to(x.device()));
}

absl::Status Router::Save(const std::string& dir) const {
  std::error_code error;
  std::filesystem::create_directories(dir, error);
  if (error) {
    return absl::InternalError(absl::StrCat(dir, ": cannot create directory: ", error.message()));
  }
  const std::string config_path = JoinPath(dir, kConfigFile);
  {
    std::ofstream out(config_path, std::ios::binary | std::ios::trunc);
    out << config_.ToJson() << "\n";
    out.flush();
    if (!out.good()) return absl::InternalError(absl::StrCat(config_path, ": write failed"));
  }
  try {
    return WriteTensors(JoinPath(dir, kWeightsFile),
                        {{kGateWeight, gate_weight_.detach()}, {kGateBias, gate_bias_.detach()}},
                        {{"format", "pt"}});
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat(dir, ": ", e.what_without_backtrace()));
  }
}

}  // namespace moelora
