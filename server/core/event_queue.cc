#include "server/core/event_queue.h"

#include <utility>

namespace callsession {

std::shared_ptr<EventSink> EventQueue::Push(v1::Event event) {
  absl::MutexLock lock(&mu_);
  if (closed_) return nullptr;
  event.set_sequence(next_sequence_++);
  if (pending_.size() >= capacity_) {
    pending_.pop_front();
    ++dropped_;
  }
  pending_.push_back(std::move(event));
  if (sink_ != nullptr && sink_waiting_) {
    sink_waiting_ = false;
    return sink_;
  }
  return nullptr;
}

std::shared_ptr<EventSink> EventQueue::Attach(std::shared_ptr<EventSink> sink) {
  absl::MutexLock lock(&mu_);
  if (closed_) return sink;
  std::shared_ptr<EventSink> previous = std::move(sink_);
  sink_ = std::move(sink);
  sink_waiting_ = false;
  return previous;
}

bool EventQueue::Next(const EventSink* sink, v1::Event* event) {
  absl::MutexLock lock(&mu_);
  if (sink_.get() != sink || sink == nullptr) return false;
  if (pending_.empty()) {
    sink_waiting_ = true;
    return false;
  }
  *event = std::move(pending_.front());
  pending_.pop_front();
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
  pending_.clear();
  sink_waiting_ = false;
  return std::move(sink_);
}

uint64_t EventQueue::dropped() const {
  absl::MutexLock lock(&mu_);
  return dropped_;
}

size_t EventQueue::pending() const {
  absl::MutexLock lock(&mu_);
  return pending_.size();
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
