#include "server/core/event_queue.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "server/core/tapi_error.h"

namespace callsession {

std::shared_ptr<EventSink> EventQueue::AddLocked(v1::Event event, uint64_t position) {
  event.set_sequence(next_sequence_++);
  if (buffer_.size() >= capacity_) buffer_.pop_front();
  buffer_.push_back(Buffered{std::move(event), position});
  if (sink_ != nullptr && sink_waiting_) {
    sink_waiting_ = false;
    return sink_;
  }
  return nullptr;
}

std::shared_ptr<EventSink> EventQueue::Push(v1::Event event) {
  absl::MutexLock lock(&mu_);
  if (closed_) return nullptr;
  return AddLocked(std::move(event), 0);
}

EventQueue::Pushed EventQueue::Push(v1::Event event, uint64_t position, std::string* record) {
  absl::MutexLock lock(&mu_);
  Pushed pushed;
  if (closed_) return pushed;
  pushed.sequence = next_sequence_;
  pushed.wake = AddLocked(std::move(event), position);
  if (record != nullptr) buffer_.back().event.SerializeToString(record);
  return pushed;
}

void EventQueue::Restore(std::deque<v1::Event> events, uint64_t cursor) {
  absl::MutexLock lock(&mu_);
  const uint64_t first = events.empty() ? 1 : events.front().sequence();
  next_sequence_ = first + events.size();
  stored_from_ = first;
  while (events.size() > capacity_) events.pop_front();
  for (v1::Event& event : events) buffer_.push_back(Buffered{std::move(event), 0});
  cursor_ = std::clamp<uint64_t>(cursor, 1, next_sequence_);
  stored_cursor_ = cursor_;
}

absl::StatusOr<std::shared_ptr<EventSink>> EventQueue::Attach(std::shared_ptr<EventSink> sink,
                                                              uint64_t from_sequence) {
  absl::MutexLock lock(&mu_);
  if (closed_) return sink;
  if (from_sequence > next_sequence_) {
    return TapiError(TapiErrorCode::kInvalParam,
                     absl::StrCat("from_sequence ", from_sequence,
                                  " is beyond the next event's sequence ", next_sequence_));
  }
  if (from_sequence != 0) cursor_ = from_sequence;
  std::shared_ptr<EventSink> previous = std::move(sink_);
  sink_ = std::move(sink);
  sink_waiting_ = false;
  return previous;
}

bool EventQueue::Next(const EventSink* sink, v1::Event* event) {
  uint64_t blocked_at = 0;
  return Next(sink, event, &blocked_at);
}

bool EventQueue::Next(const EventSink* sink, v1::Event* event, uint64_t* blocked_at) {
  *blocked_at = 0;
  absl::MutexLock lock(&mu_);
  if (sink_.get() != sink || sink == nullptr) return false;
  const uint64_t first = first_buffered_sequence();
  if (cursor_ < first) {
    // The lost range ends just before buffer_.front(); positions only grow,
    // so once that event is durable the whole range existed for good.
    if (!DurableLocked(buffer_.front().position)) {
      *blocked_at = buffer_.front().position;
      sink_waiting_ = true;
      return false;
    }
    event->Clear();
    v1::EventsLostEvent* gap = event->mutable_events_lost();
    gap->set_first_sequence(cursor_);
    gap->set_last_sequence(first - 1);
    lost_ += first - cursor_;
    cursor_ = first;
    return true;
  }
  if (cursor_ >= next_sequence_) {
    sink_waiting_ = true;
    return false;
  }
  const Buffered& next = buffer_[cursor_ - first];
  if (!DurableLocked(next.position)) {
    *blocked_at = next.position;
    sink_waiting_ = true;
    return false;
  }
  *event = next.event;
  ++cursor_;
  return true;
}

void EventQueue::Detach(const EventSink* sink) {
  absl::MutexLock lock(&mu_);
  if (sink_.get() == sink) {
    sink_.reset();
    sink_waiting_ = false;
  }
}

std::shared_ptr<EventSink> EventQueue::Close() {
  absl::MutexLock lock(&mu_);
  closed_ = true;
  buffer_.clear();
  buffer_.shrink_to_fit();
  cursor_ = next_sequence_;
  sink_waiting_ = false;
  return std::move(sink_);
}

uint64_t EventQueue::next_sequence() const {
  absl::MutexLock lock(&mu_);
  return next_sequence_;
}

uint64_t EventQueue::first_undurable_sequence() const {
  absl::MutexLock lock(&mu_);
  uint64_t sequence = next_sequence_;
  for (auto it = buffer_.rbegin(); it != buffer_.rend() && !DurableLocked(it->position); ++it) {
    --sequence;
  }
  return sequence;
}

std::optional<std::pair<uint64_t, uint64_t>> EventQueue::TakeEvictedRange(uint64_t min_count) {
  absl::MutexLock lock(&mu_);
  const uint64_t first = first_buffered_sequence();
  if (first < stored_from_ + min_count) return std::nullopt;
  std::pair<uint64_t, uint64_t> range(stored_from_, first);
  stored_from_ = first;
  return range;
}

std::optional<uint64_t> EventQueue::TakeCursorToStore(uint64_t min_moved) {
  absl::MutexLock lock(&mu_);
  if (closed_) return std::nullopt;
  const uint64_t moved =
      cursor_ > stored_cursor_ ? cursor_ - stored_cursor_ : stored_cursor_ - cursor_;
  if (moved == 0 || moved < min_moved) return std::nullopt;
  stored_cursor_ = cursor_;
  return cursor_;
}

uint64_t EventQueue::lost() const {
  absl::MutexLock lock(&mu_);
  return lost_;
}

size_t EventQueue::buffered() const {
  absl::MutexLock lock(&mu_);
  return buffer_.size();
}

size_t EventQueue::undelivered() const {
  absl::MutexLock lock(&mu_);
  return next_sequence_ - std::max(cursor_, first_buffered_sequence());
}

bool EventQueue::has_consumer() const {
  absl::MutexLock lock(&mu_);
  return sink_ != nullptr;
}

EventPublisher::~EventPublisher() {
  if (calls_.empty()) return;
  if (journal_ == nullptr || position_ <= journal_->durable_position()) {
    Run(calls_);
    return;
  }
  journal_->WhenDurable(position_, [calls = std::move(calls_)]() mutable { Run(calls); });
}

void EventPublisher::Run(absl::InlinedVector<Call, 2>& calls) {
  for (const Call& call : calls) {
    if (call.end) {
      call.sink->OnSubscriptionEnded(absl::OkStatus());
    } else {
      call.sink->OnEventsAvailable();
    }
  }
}

void EventPublisher::Push(EventQueue& queue, v1::Event event) {
  if (std::shared_ptr<EventSink> sink = queue.Push(std::move(event))) {
    calls_.push_back(Call{std::move(sink), false});
  }
}

void EventPublisher::Wake(std::shared_ptr<EventSink> sink, uint64_t position) {
  position_ = std::max(position_, position);
  calls_.push_back(Call{std::move(sink), false});
}

void EventPublisher::End(std::shared_ptr<EventSink> sink, uint64_t position) {
  position_ = std::max(position_, position);
  calls_.push_back(Call{std::move(sink), true});
}

}  // namespace callsession
