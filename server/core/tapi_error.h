// TAPI error names and the one table that maps each to a status code.
//
// Every error the core returns is built by TapiError(): its message starts
// with the TAPI name ("LINEERR_INVALCALLHANDLE: no such call handle"), so the
// name survives any transport, and TapiErrorName() reads it back.
#ifndef CALLSESSION_SERVER_CORE_TAPI_ERROR_H_
#define CALLSESSION_SERVER_CORE_TAPI_ERROR_H_

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace callsession {

enum class TapiErrorCode {
  kBadDeviceId,       // NOT_FOUND
  kInvalAddress,      // INVALID_ARGUMENT
  kInvalAppName,      // INVALID_ARGUMENT
  kInvalCallHandle,   // NOT_FOUND
  kInvalCallState,    // FAILED_PRECONDITION
  kInvalLineHandle,   // NOT_FOUND
  kInvalParam,        // INVALID_ARGUMENT
  kInvalPrivSelect,   // INVALID_ARGUMENT
  kNotOwner,          // PERMISSION_DENIED
  kOperationUnavail,  // PERMISSION_DENIED: the tenant may not (tenants.proto)
  kResourceUnavail,   // RESOURCE_EXHAUSTED
  kUninitialized,     // UNAUTHENTICATED
};

// "LINEERR_BADDEVICEID" and so on.
absl::string_view TapiErrorNameOf(TapiErrorCode code);

// The canonical status code for a TAPI error.
absl::StatusCode StatusCodeOf(TapiErrorCode code);

// A status with StatusCodeOf(code) and the message "<NAME>: <detail>".
absl::Status TapiError(TapiErrorCode code, absl::string_view detail);

// The TAPI name a status message starts with, or "" if it has none.
absl::string_view TapiErrorName(const absl::Status& status);

}  // namespace callsession

#endif  // CALLSESSION_SERVER_CORE_TAPI_ERROR_H_
