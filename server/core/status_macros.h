// Early-return helpers for absl::Status, which Abseil 20220623 lacks.
#ifndef CALLSESSION_SERVER_CORE_STATUS_MACROS_H_
#define CALLSESSION_SERVER_CORE_STATUS_MACROS_H_

#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

// Returns from the enclosing function if `expr` is not OK.
#define CS_RETURN_IF_ERROR(expr)                                \
  do {                                                          \
    if (::absl::Status cs_status_ = (expr); !cs_status_.ok()) { \
      return cs_status_;                                        \
    }                                                           \
  } while (false)

#define CS_STATUS_CONCAT_INNER_(a, b) a##b
#define CS_STATUS_CONCAT_(a, b) CS_STATUS_CONCAT_INNER_(a, b)

// `lhs = value of expr` if it is OK; otherwise returns its status.
#define CS_ASSIGN_OR_RETURN(lhs, expr) \
  CS_ASSIGN_OR_RETURN_IMPL_(CS_STATUS_CONCAT_(cs_statusor_, __LINE__), lhs, expr)
#define CS_ASSIGN_OR_RETURN_IMPL_(statusor, lhs, expr)     \
  auto statusor = (expr);                                  \
  if (!statusor.ok()) return std::move(statusor).status(); \
  lhs = *std::move(statusor)

#endif  // CALLSESSION_SERVER_CORE_STATUS_MACROS_H_
