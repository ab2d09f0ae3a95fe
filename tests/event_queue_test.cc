#include "server/core/event_queue.h"

#include <memory>

#include "gtest/gtest.h"

namespace callsession {
namespace {

class CountingSink final : public EventSink {
 public:
  void OnEventsAvailable() override { ++wakes; }
  void OnSubscriptionEnded(const absl::Status& why) override { ended = why; }
  int wakes = 0;
  absl::Status ended = absl::UnknownError("not ended");
};

v1::Event StateEvent(uint64_t handle) {
  v1::Event event;
  event.mutable_call_state()->set_call_handle(handle);
  return event;
}

TEST(EventQueueTest, NumbersEventsInPushOrder) {
  EventQueue queue(10);
  auto sink = std::make_shared<CountingSink>();
  ASSERT_EQ(queue.Attach(sink), nullptr);
  for (uint64_t i = 1; i <= 3; ++i) queue.Push(StateEvent(i));
  v1::Event event;
  for (uint64_t i = 1; i <= 3; ++i) {
    ASSERT_TRUE(queue.Next(sink.get(), &event));
    EXPECT_EQ(event.sequence(), i);
    EXPECT_EQ(event.call_state().call_handle(), i);
  }
  EXPECT_FALSE(queue.Next(sink.get(), &event));
}

TEST(EventQueueTest, WakesAWaitingSinkOnceAfterItFoundNothing) {
  EventQueue queue(10);
  auto sink = std::make_shared<CountingSink>();
  queue.Attach(sink);
  EXPECT_EQ(queue.Push(StateEvent(1)), nullptr) << "the sink has not asked yet";
  v1::Event event;
  ASSERT_TRUE(queue.Next(sink.get(), &event));
  ASSERT_FALSE(queue.Next(sink.get(), &event));  // now waiting
  EXPECT_EQ(queue.Push(StateEvent(2)), sink);
  EXPECT_EQ(queue.Push(StateEvent(3)), nullptr) << "woken once, not per event";
}

TEST(EventQueueTest, OverflowDiscardsTheOldestAndLeavesAGap) {
  EventQueue queue(3);
  auto sink = std::make_shared<CountingSink>();
  queue.Attach(sink);
  for (uint64_t i = 1; i <= 5; ++i) queue.Push(StateEvent(i));
  EXPECT_EQ(queue.pending(), 3u);
  EXPECT_EQ(queue.dropped(), 2u);
  v1::Event event;
  ASSERT_TRUE(queue.Next(sink.get(), &event));
  EXPECT_EQ(event.sequence(), 3u) << "1 and 2 were discarded";
}

TEST(EventQueueTest, OnlyTheCurrentSinkReceives) {
  EventQueue queue(10);
  auto first = std::make_shared<CountingSink>();
  auto second = std::make_shared<CountingSink>();
  queue.Attach(first);
  EXPECT_EQ(queue.Attach(second), first) << "the replaced sink is returned to be ended";
  queue.Push(StateEvent(1));
  v1::Event event;
  EXPECT_FALSE(queue.Next(first.get(), &event));
  EXPECT_TRUE(queue.Next(second.get(), &event));
  queue.Detach(second.get());
  EXPECT_FALSE(queue.has_consumer());
}

TEST(EventQueueTest, CloseReturnsTheSinkAndDropsLaterEvents) {
  EventQueue queue(10);
  auto sink = std::make_shared<CountingSink>();
  queue.Attach(sink);
  EXPECT_EQ(queue.Close(), sink);
  EXPECT_EQ(queue.Push(StateEvent(1)), nullptr);
  EXPECT_EQ(queue.pending(), 0u);
  auto late = std::make_shared<CountingSink>();
  EXPECT_EQ(queue.Attach(late), late) << "a closed queue refuses new sinks";
}

}  // namespace
}  // namespace callsession
