// An fdatasync() that does no I/O, for the benchmark's "what a sync costs"
// section (run_benchmarks.py): preloaded under callsessiond with
// LD_PRELOAD, it splits the cost of a durable reply into the wait for the
// sync and the CPU the kernel spends doing it. It makes nothing durable:
// never preload it outside that benchmark.
//
// CALLSESSION_BENCH_SYNC_WAIT_US (read once): 0 or unset returns at once;
// N > 0 blocks the calling thread for at least N microseconds (a sleep, as a
// thread waiting for a device does), with the timer slack lowered so that the
// wait is N plus the wake-up latency rather than N plus 50 us.

#include <sys/prctl.h>
#include <time.h>

#include <cerrno>
#include <cstdlib>

namespace {

long WaitMicros() {
  static const long micros = [] {
    const char* value = std::getenv("CALLSESSION_BENCH_SYNC_WAIT_US");
    return value == nullptr ? 0L : std::strtol(value, nullptr, 10);
  }();
  return micros;
}

void SleepMicros(long micros) {
  prctl(PR_SET_TIMERSLACK, 1UL, 0UL, 0UL, 0UL);
  timespec remaining{micros / 1'000'000, (micros % 1'000'000) * 1000};
  while (nanosleep(&remaining, &remaining) != 0 && errno == EINTR) {
  }
}

}  // namespace

extern "C" int fdatasync(int /*fd*/) {
  if (const long micros = WaitMicros(); micros > 0) SleepMicros(micros);
  return 0;
}

extern "C" int fsync(int fd) { return fdatasync(fd); }
