#ifndef MOELORA_CORE_STATUS_MACROS_H_
#define MOELORA_CORE_STATUS_MACROS_H_

#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

// Short call sites for absl::Status plumbing, as in TF Serving and Triton.
#define MOELORA_CONCAT_INNER_(a, b) a##b
#define MOELORA_CONCAT_(a, b) MOELORA_CONCAT_INNER_(a, b)

#define RETURN_IF_ERROR(expr)                \
  do {                                       \
    ::absl::Status moelora_status_ = (expr); \
    if (!moelora_status_.ok()) {             \
      return moelora_status_;                \
    }                                        \
  } while (false)

#define ASSIGN_OR_RETURN(lhs, expr) \
  ASSIGN_OR_RETURN_IMPL_(MOELORA_CONCAT_(moelora_statusor_, __LINE__), lhs, expr)

#define ASSIGN_OR_RETURN_IMPL_(statusor, lhs, expr) \
  auto statusor = (expr);                           \
  if (!statusor.ok()) {                             \
    return std::move(statusor).status();            \
  }                                                 \
  lhs = std::move(statusor).value()

#endif  // MOELORA_CORE_STATUS_MACROS_H_
