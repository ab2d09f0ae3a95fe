// Per-application event queues and the protocol by which a stream drains one.
//
// Sequence numbers are assigned when an event is pushed, by the thread that
// made the change, while it still holds the lock of the thing it changed; so
// an application's events are numbered in the order of the changes behind
// them. The queue holds at most `capacity` undelivered events: when full,
// the oldest is discarded (counted in dropped()), and the consumer sees the
// gap in `sequence`. Memory per application is therefore bounded whatever
// the consumer does.
#ifndef CALLSESSION_SERVER_CORE_EVENT_QUEUE_H_
#define CALLSESSION_SERVER_CORE_EVENT_QUEUE_H_

#include <cstdint>
#include <deque>
#include <memory>

#include "absl/base/thread_annotations.h"
#include "absl/container/inlined_vector.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "callsession/v1/types.pb.h"

namespace callsession {

// The consumer of one application's events (the WatchEvents stream).
class EventSink {
 public:
  virtual ~EventSink() = default;

  // Events are available again after the sink's last EventQueue::Next call
  // found the queue empty. Called at most once per such empty Next, with no
  // core lock held; must not block.
  virtual void OnEventsAvailable() = 0;

  // The subscription is over: the application shut down (OK) or another
  // sink replaced this one (ABORTED). Called with no core lock held. Next
  // returns false for this sink from now on.
  virtual void OnSubscriptionEnded(const absl::Status& why) = 0;
};

// Thread-safe. The mutex is a leaf: no other lock is taken while it is held.
class EventQueue {
 public:
  explicit EventQueue(size_t capacity) : capacity_(capacity) {}

  EventQueue(const EventQueue&) = delete;
  EventQueue& operator=(const EventQueue&) = delete;

  // Queues `event` with the next sequence number. Returns the sink to wake
  // (call OnEventsAvailable once the caller holds no lock), or nullptr.
  std::shared_ptr<EventSink> Push(v1::Event event);

  // Makes `sink` the consumer; returns the sink it replaces (to be told
  // OnSubscriptionEnded by the caller), or nullptr. Returns `sink` itself
  // if the queue was closed: the caller must end it at once.
  std::shared_ptr<EventSink> Attach(std::shared_ptr<EventSink> sink);

  // Moves the oldest undelivered event into *event. Returns false if `sink`
  // is not the current consumer or nothing is queued; in the second case the
  // sink will get OnEventsAvailable when something is.
  bool Next(const EventSink* sink, v1::Event* event);

  // Stops delivering to `sink` if it is the current consumer.
  void Detach(const EventSink* sink);

  // Closes the queue for good (application shutdown): returns the consumer
  // to end, or nullptr. Later pushes are discarded.
  std::shared_ptr<EventSink> Close();

  uint64_t dropped() const;
  size_t pending() const;
  bool has_consumer() const;

 private:
  const size_t capacity_;
  mutable absl::Mutex mu_;
  uint64_t next_sequence_ ABSL_GUARDED_BY(mu_) = 1;
  uint64_t dropped_ ABSL_GUARDED_BY(mu_) = 0;
  bool closed_ ABSL_GUARDED_BY(mu_) = false;
  std::deque<v1::Event> pending_ ABSL_GUARDED_BY(mu_);
  std::shared_ptr<EventSink> sink_ ABSL_GUARDED_BY(mu_);
  // True once the sink's Next found nothing: it is waiting to be woken.
  bool sink_waiting_ ABSL_GUARDED_BY(mu_) = false;
};

// Collects the sinks woken by one core operation and wakes them when it goes
// out of scope. Declare it before any lock guard in the operation, so that it
// is destroyed, and the sinks are called, after every lock is released.
class EventPublisher {
 public:
  EventPublisher() = default;
  EventPublisher(const EventPublisher&) = delete;
  EventPublisher& operator=(const EventPublisher&) = delete;
  ~EventPublisher();

  void Push(EventQueue& queue, v1::Event event);

 private:
  absl::InlinedVector<std::shared_ptr<EventSink>, 2> to_wake_;
};

}  // namespace callsession

#endif  // CALLSESSION_SERVER_CORE_EVENT_QUEUE_H_
