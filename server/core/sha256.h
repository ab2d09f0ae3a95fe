// SHA-256 (OpenSSL's libcrypto), for secrets that must never be stored in
// the clear: app token secrets now, API keys later.
#ifndef CALLSESSION_SERVER_CORE_SHA256_H_
#define CALLSESSION_SERVER_CORE_SHA256_H_

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/strings/string_view.h"

namespace callsession {

using Sha256Digest = std::array<uint8_t, 32>;

// Thread-safe; about 100 ns for a short input.
Sha256Digest Sha256(absl::string_view data);

// Sha256(data) as 64 lowercase hex digits, as `sha256sum` prints it.
std::string Sha256Hex(absl::string_view data);

// Compares without an early exit, so the time taken does not tell an
// attacker how much of a guess was right.
bool ConstantTimeEquals(const uint8_t* a, const uint8_t* b, size_t size);

}  // namespace callsession

#endif  // CALLSESSION_SERVER_CORE_SHA256_H_
