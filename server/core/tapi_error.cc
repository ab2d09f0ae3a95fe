#include "server/core/tapi_error.h"

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace callsession {

absl::string_view TapiErrorNameOf(TapiErrorCode code) {
  switch (code) {
    case TapiErrorCode::kBadDeviceId:
      return "LINEERR_BADDEVICEID";
    case TapiErrorCode::kInvalAddress:
      return "LINEERR_INVALADDRESS";
    case TapiErrorCode::kInvalAppName:
      return "LINEERR_INVALAPPNAME";
    case TapiErrorCode::kInvalCallHandle:
      return "LINEERR_INVALCALLHANDLE";
    case TapiErrorCode::kInvalCallState:
      return "LINEERR_INVALCALLSTATE";
    case TapiErrorCode::kInvalLineHandle:
      return "LINEERR_INVALLINEHANDLE";
    case TapiErrorCode::kInvalParam:
      return "LINEERR_INVALPARAM";
    case TapiErrorCode::kInvalPrivSelect:
      return "LINEERR_INVALPRIVSELECT";
    case TapiErrorCode::kNotOwner:
      return "LINEERR_NOTOWNER";
    case TapiErrorCode::kOperationUnavail:
      return "LINEERR_OPERATIONUNAVAIL";
    case TapiErrorCode::kResourceUnavail:
      return "LINEERR_RESOURCEUNAVAIL";
    case TapiErrorCode::kUninitialized:
      return "LINEERR_UNINITIALIZED";
  }
  return "LINEERR_OPERATIONFAILED";
}

absl::StatusCode StatusCodeOf(TapiErrorCode code) {
  switch (code) {
    case TapiErrorCode::kBadDeviceId:
    case TapiErrorCode::kInvalCallHandle:
    case TapiErrorCode::kInvalLineHandle:
      return absl::StatusCode::kNotFound;
    case TapiErrorCode::kInvalCallState:
      return absl::StatusCode::kFailedPrecondition;
    case TapiErrorCode::kNotOwner:
    case TapiErrorCode::kOperationUnavail:
      return absl::StatusCode::kPermissionDenied;
    case TapiErrorCode::kInvalAddress:
    case TapiErrorCode::kInvalAppName:
    case TapiErrorCode::kInvalParam:
    case TapiErrorCode::kInvalPrivSelect:
      return absl::StatusCode::kInvalidArgument;
    case TapiErrorCode::kUninitialized:
      return absl::StatusCode::kUnauthenticated;
    case TapiErrorCode::kResourceUnavail:
      return absl::StatusCode::kResourceExhausted;
  }
  return absl::StatusCode::kInternal;
}

absl::Status TapiError(TapiErrorCode code, absl::string_view detail) {
  return absl::Status(StatusCodeOf(code), absl::StrCat(TapiErrorNameOf(code), ": ", detail));
}

absl::string_view TapiErrorName(const absl::Status& status) {
  absl::string_view message = status.message();
  if (!absl::StartsWith(message, "LINEERR_")) return {};
  size_t end = message.find(':');
  return end == absl::string_view::npos ? message : message.substr(0, end);
}

}  // namespace callsession
