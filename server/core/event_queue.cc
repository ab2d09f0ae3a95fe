#include "server/core/event_queue.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "server/core/tapi_error.h"

namespace callsession {

std::shared_ptr<EventSink> EventQueue::Push(v1::Event event) {
  absl::MutexLock lock(&mu_);
  if (closed_) return nullptr;
  event.set_sequence(next_sequence_++);
  if (buffer_.size() >= capacity_) buffer_.pop_front();
  buffer_.push_back(std::move(event));
  if (sink_ != nullptr && sink_waiting_) {
    sink_waiting_ = false;
    return sink_;
  }
  return nullptr;
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
  absl::MutexLock lock(&mu_);
  if (sink_.get() != sink || sink == nullptr) return false;
  const uint64_t first = first_buffered_sequence();
  if (cursor_ < first) {
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
  *event = buffer_[cursor_ - first];
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
  for (const std::shared_ptr<EventSink>& sink : to_wake_) {
    sink->OnEventsAvailable();
  }
}

void EventPublisher::Push(EventQueue& queue, v1::Event event) {
  if (std::shared_ptr<EventSink> sink = queue.Push(std::move(event))) {
    to_wake_.push_back(std::move(sink));
  }
}

}  // namespace callsession
