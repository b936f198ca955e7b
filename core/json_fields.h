#ifndef MOELORA_CORE_JSON_FIELDS_H_
#define MOELORA_CORE_JSON_FIELDS_H_

// Typed reads of JSON config fields (config.json, adapter_config.json, router_config.json) with
// errors that name the file and the field. Internal to core (nlohmann is core's private dep).

#include <cstdint>
#include <optional>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "nlohmann/json.hpp"

namespace moelora::json_fields {

// InvalidArgument "<label>: field '<field>' <what>".
absl::Status FieldError(absl::string_view label, absl::string_view field, absl::string_view what);

// Absent or null: `fallback`, or "is required" when there is none.
absl::StatusOr<int64_t> Int(const nlohmann::json& json, absl::string_view label, const char* field,
                            std::optional<int64_t> fallback = std::nullopt);
absl::StatusOr<double> Number(const nlohmann::json& json, absl::string_view label,
                              const char* field, double fallback);
absl::StatusOr<bool> Bool(const nlohmann::json& json, absl::string_view label, const char* field,
                          bool fallback);

}  // namespace moelora::json_fields

#endif  // MOELORA_CORE_JSON_FIELDS_H_
