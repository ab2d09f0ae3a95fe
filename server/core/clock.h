// The source of time for the core, injected so that tests control it.
#ifndef CALLSESSION_SERVER_CORE_CLOCK_H_
#define CALLSESSION_SERVER_CORE_CLOCK_H_

#include "absl/time/time.h"

namespace callsession {

// Thread-safe: Now() may be called from any thread.
class Clock {
 public:
  virtual ~Clock() = default;
  virtual absl::Time Now() const = 0;
};

// The wall clock. The returned object lives for the whole process.
Clock& RealClock();

}  // namespace callsession

#endif  // CALLSESSION_SERVER_CORE_CLOCK_H_
