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
//
// With a journal (see journal.h), each event carries the position of the
// journal entry that recorded it, and Next delivers nothing a crash could
// take back: an event waits until its entry is durable, and so does a loss
// notice, until the first event after the gap is.
#ifndef CALLSESSION_SERVER_CORE_EVENT_QUEUE_H_
#define CALLSESSION_SERVER_CORE_EVENT_QUEUE_H_

#include <cstdint>
#include <deque>
#include <memory>
#include <optional>
#include <string>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/container/inlined_vector.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "callsession/v1/types.pb.h"
#include "server/core/journal.h"

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
  // `capacity` >= 1. `journal` (not owned, may be null: every event is
  // deliverable at once) must outlive the queue.
  explicit EventQueue(size_t capacity, const Journal* journal = nullptr)
      : capacity_(capacity), journal_(journal) {}

  EventQueue(const EventQueue&) = delete;
  EventQueue& operator=(const EventQueue&) = delete;

  // Buffers `event` with the next sequence number, evicting the oldest
  // buffered event when full. Returns the sink to wake (call
  // OnEventsAvailable once the caller holds no lock), or nullptr.
  std::shared_ptr<EventSink> Push(v1::Event event);

  struct Pushed {
    // 0 if the queue is closed (the event was discarded).
    uint64_t sequence = 0;
    // The sink to wake once the event is deliverable, or nullptr.
    std::shared_ptr<EventSink> wake;
  };
  // Push for a journaled change: the event becomes deliverable once the
  // journal entry at `position` is durable. If `record` is not null, it gets
  // the event as stored (serialized, with its sequence).
  Pushed Push(v1::Event event, uint64_t position, std::string* record);

  // Recovery: makes the queue hold `events` (consecutive sequences, oldest
  // first; the newest `capacity` are kept) with delivery for from_sequence 0
  // resuming at `cursor`. The queue must be new.
  void Restore(std::deque<v1::Event> events, uint64_t cursor);

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
  // Next, and if it returns false because the next thing to deliver waits
  // for the journal, sets *blocked_at to the position it waits for (else
  // 0); the sink gets no OnEventsAvailable for that, so the caller must
  // arrange a wake once that position is durable.
  bool Next(const EventSink* sink, v1::Event* event, uint64_t* blocked_at);

  // Stops delivering to `sink` if it is the current consumer.
  void Detach(const EventSink* sink);

  // Closes the queue for good (application shutdown): returns the consumer
  // to end, or nullptr. Later pushes are discarded.
  std::shared_ptr<EventSink> Close();

  // The sequence the next pushed event will get.
  uint64_t next_sequence() const;
  // The first sequence not yet durable (next_sequence() without a journal):
  // where a stream should resume to see every change from now on, even
  // after a crash.
  uint64_t first_undurable_sequence() const;

  // For the journal: [begin, end) of sequences evicted from the buffer but
  // perhaps still stored, once there are at least `min_count` of them
  // (then they count as deleted). nullopt if fewer.
  std::optional<std::pair<uint64_t, uint64_t>> TakeEvictedRange(uint64_t min_count);
  // For the journal: the delivery cursor, if it moved at least `min_moved`
  // from the one last taken (then this one counts as stored). nullopt if
  // not, or if the queue is closed.
  std::optional<uint64_t> TakeCursorToStore(uint64_t min_moved);
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
  bool DurableLocked(uint64_t position) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return position == 0 || journal_ == nullptr || position <= journal_->durable_position();
  }
  // Buffers `event` under the next sequence; returns the sink to wake.
  std::shared_ptr<EventSink> AddLocked(v1::Event event, uint64_t position)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  struct Buffered {
    v1::Event event;
    uint64_t position;  // of its journal entry; 0 when durable from the start
  };

  const size_t capacity_;
  const Journal* const journal_;
  mutable absl::Mutex mu_;
  uint64_t next_sequence_ ABSL_GUARDED_BY(mu_) = 1;
  // The next sequence to deliver; may lag behind the buffer (then the
  // events in between were lost and Next reports it).
  uint64_t cursor_ ABSL_GUARDED_BY(mu_) = 1;
  uint64_t lost_ ABSL_GUARDED_BY(mu_) = 0;
  bool closed_ ABSL_GUARDED_BY(mu_) = false;
  // Sequences next_sequence_ - buffer_.size() .. next_sequence_ - 1, with
  // non-decreasing positions.
  std::deque<Buffered> buffer_ ABSL_GUARDED_BY(mu_);
  // Sequences below this are known deleted from the journal.
  uint64_t stored_from_ ABSL_GUARDED_BY(mu_) = 1;
  // The cursor as last stored in the journal.
  uint64_t stored_cursor_ ABSL_GUARDED_BY(mu_) = 1;
  std::shared_ptr<EventSink> sink_ ABSL_GUARDED_BY(mu_);
  // True once the sink's Next found nothing: it is waiting to be woken.
  bool sink_waiting_ ABSL_GUARDED_BY(mu_) = false;
};

// Collects the sinks woken (or ended) by one core operation and calls them
// when it goes out of scope: at once without a journal, else once the
// newest journal entry they wait for is durable. Declare it before any lock
// guard in the operation, so that it is destroyed, and the sinks are called,
// after every lock is released.
class EventPublisher {
 public:
  // `journal` (not owned) may be null.
  explicit EventPublisher(Journal* journal = nullptr) : journal_(journal) {}
  EventPublisher(const EventPublisher&) = delete;
  EventPublisher& operator=(const EventPublisher&) = delete;
  ~EventPublisher();

  // Pushes an event that needs no journal entry.
  void Push(EventQueue& queue, v1::Event event);
  // Wakes `sink` once journal entry `position` is durable.
  void Wake(std::shared_ptr<EventSink> sink, uint64_t position);
  // Ends `sink` with OK (its application shut down) once `position` is
  // durable.
  void End(std::shared_ptr<EventSink> sink, uint64_t position);

 private:
  struct Call {
    std::shared_ptr<EventSink> sink;
    bool end;
  };
  static void Run(absl::InlinedVector<Call, 2>& calls);

  Journal* const journal_;
  uint64_t position_ = 0;  // the newest entry the calls wait for
  absl::InlinedVector<Call, 2> calls_;
};

}  // namespace callsession

#endif  // CALLSESSION_SERVER_CORE_EVENT_QUEUE_H_
