#ifndef MOELORA_CORE_JSON_FIELDS_H_
#define MOELORA_CORE_JSON_FIELDS_H_

// Typed reads of JSON config fields (config.json, adapter_config.json, router_config.json) with
// errors that name the file and the field. Internal to core (nlohmann is core's private dep).
// Templates over the JSON type: adapters parse with nlohmann::ordered_json, the rest with json.

#include <cstdint>
#include <optional>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace moelora::json_fields {

// InvalidArgument "<label>: field '<field>' <what>".
inline absl::Status FieldError(absl::string_view label, absl::string_view field,
                               absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(label, ": field '", field, "' ", what));
}

// Absent or null: `fallback`, or "is required" when there is none.
template <typename Json>
absl::StatusOr<int64_t> Int(const Json& json, absl::string_view label, const char* field,
                            std::optional<int64_t> fallback = std::nullopt) {
  auto it = json.find(field);
  if (it == json.end() || it->is_null()) {
    if (fallback.has_value()) return *fallback;
    return FieldError(label, field, "is required");
  }
  if (!it->is_number_integer()) return FieldError(label, field, "must be an integer");
  return it->template get<int64_t>();
}

template <typename Json>
absl::StatusOr<double> Number(const Json& json, absl::string_view label, const char* field,
                              double fallback) {
  auto it = json.find(field);
  if (it == json.end() || it->is_null()) return fallback;
  if (!it->is_number()) return FieldError(label, field, "must be a number");
  return it->template get<double>();
}

template <typename Json>
absl::StatusOr<bool> Bool(const Json& json, absl::string_view label, const char* field,
                          bool fallback) {
  auto it = json.find(field);
  if (it == json.end() || it->is_null()) return fallback;
  if (!it->is_boolean()) return FieldError(label, field, "must be true or false");
  return it->template get<bool>();
}

}  // namespace moelora::json_fields

#endif  // MOELORA_CORE_JSON_FIELDS_H_
