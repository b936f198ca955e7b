#include "core/json_fields.h"

#include "absl/strings/str_cat.h"

namespace moelora::json_fields {

absl::Status FieldError(absl::string_view label, absl::string_view field, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(label, ": field '", field, "' ", what));
}

absl::StatusOr<int64_t> Int(const nlohmann::json& json, absl::string_view label, const char* field,
                            std::optional<int64_t> fallback) {
  auto it = json.find(field);
  if (it == json.end() || it->is_null()) {
    if (fallback.has_value()) return *fallback;
    return FieldError(label, field, "is required");
  }
  if (!it->is_number_integer()) return FieldError(label, field, "must be an integer");
  return it->get<int64_t>();
}

absl::StatusOr<double> Number(const nlohmann::json& json, absl::string_view label,
                              const char* field, double fallback) {
  auto it = json.find(field);
  if (it == json.end() || it->is_null()) return fallback;
  if (!it->is_number()) return FieldError(label, field, "must be a number");
  return it->get<double>();
}

absl::StatusOr<bool> Bool(const nlohmann::json& json, absl::string_view label, const char* field,
                          bool fallback) {
  auto it = json.find(field);
  if (it == json.end() || it->is_null()) return fallback;
  if (!it->is_boolean()) return FieldError(label, field, "must be true or false");
  return it->get<bool>();
}

}  // namespace moelora::json_fields
