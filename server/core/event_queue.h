// Per-application event buffers and the protocol by which a stream drains one.
//
// Sequence numbers are assigned when an event is pushed, by the thread that
// made the change, while it still holds the lock of the thing it changed; so
// an application's events are numbered 1, 2, 3... in the order of the
// changes behind them.
//
// The buffer keeps the application's most recent `capacity` events, whether
// delivered or not, so that a client that reconnects can ask for a replay
// from the last sequence it saw (Attach's from_sequence). Memory per
// application is therefore bounded whatever the consumer does. A consumer
// that falls more than `capacity` events behind, or asks for a sequence no
// longer buffered, loses the oldest ones; it is told so explicitly: Next
// yields an EventsLostEvent (sequence 0) naming the lost range, before the
// first event it still has.
#ifndef CALLSESSION_SERVER_CORE_EVENT_QUEUE_H_
#define CALLSESSION_SERVER_CORE_EVENT_QUEUE_H_

#include <cstdint>
#include <deque>
#include <memory>

#include "absl/base/thread_annotations.h"
#include "absl/container/inlined_vector.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "callsession/v1/types.pb.h"

namespace callsession {

// The consumer of one application's events (the WatchEvents stream).
class EventSink {
 public:
  virtual ~EventSink() = default;

  // Events are available again after the sink's last EventQueue::Next call
  // found nothing to deliver. Called at most once per such empty Next, with
  // no core lock held; must not block.
  virtual void OnEventsAvailable() = 0;

  // The subscription is over: the application shut down (OK) or another
  // sink replaced this one (ABORTED). Called with no core lock held. Next
  // returns false for this sink from now on.
  virtual void OnSubscriptionEnded(const absl::Status& why) = 0;
};

// Thread-safe. The mutex is a leaf: no other lock is taken while it is held.
class EventQueue {
 public:
  // `capacity` >= 1.
  explicit EventQueue(size_t capacity) : capacity_(capacity) {}

  EventQueue(const EventQueue&) = delete;
  EventQueue& operator=(const EventQueue&) = delete;

  // Buffers `event` with the next sequence number, evicting the oldest
  // buffered event when full. Returns the sink to wake (call
  // OnEventsAvailable once the caller holds no lock), or nullptr.
  std::shared_ptr<EventSink> Push(v1::Event event);

  // Makes `sink` the consumer, delivering from `from_sequence` on; 0 means
  // "from the first event no earlier consumer was given". Returns the sink
  // it replaces (to be told OnSubscriptionEnded by the caller), or nullptr.
  // Returns `sink` itself if the queue was closed: the caller must end it at
  // once. INVALID_ARGUMENT if from_sequence is beyond next_sequence(); then
  // nothing changes.
  absl::StatusOr<std::shared_ptr<EventSink>> Attach(std::shared_ptr<EventSink> sink,
                                                    uint64_t from_sequence = 0);

  // Copies the next event for `sink` into *event: an EventsLostEvent first
  // if events it should get were evicted, then buffered events in sequence
  // order. Returns false if `sink` is not the current consumer or it is up
  // to date; in the second case the sink will get OnEventsAvailable when an
  // event is pushed.
  bool Next(const EventSink* sink, v1::Event* event);

  // Stops delivering to `sink` if it is the current consumer.
  void Detach(const EventSink* sink);

  // Closes the queue for good (application shutdown): returns the consumer
  // to end, or nullptr. Later pushes are discarded.
  std::shared_ptr<EventSink> Close();

  // The sequence the next pushed event will get.
  uint64_t next_sequence() const;
  // Events evicted before any consumer got them, as reported by Next.
  uint64_t lost() const;
  // Events buffered, delivered or not.
  size_t buffered() const;
  // Buffered events the consumer has not been given yet.
  size_t undelivered() const;
  bool has_consumer() const;

 private:
  uint64_t first_buffered_sequence() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return next_sequence_ - buffer_.size();
  }

  const size_t capacity_;
  mutable absl::Mutex mu_;
  uint64_t next_sequence_ ABSL_GUARDED_BY(mu_) = 1;
  // The next sequence to deliver; may lag behind the buffer (then the
  // events in between were lost and Next reports it).
  uint64_t cursor_ ABSL_GUARDED_BY(mu_) = 1;
  uint64_t lost_ ABSL_GUARDED_BY(mu_) = 0;
  bool closed_ ABSL_GUARDED_BY(mu_) = false;
  // Sequences next_sequence_ - buffer_.size() .. next_sequence_ - 1.
  std::deque<v1::Event> buffer_ ABSL_GUARDED_BY(mu_);
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
