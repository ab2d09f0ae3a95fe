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
  ASSERT_EQ(*queue.Attach(sink), nullptr);
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
  ASSERT_TRUE(queue.Attach(sink).ok());
  EXPECT_EQ(queue.Push(StateEvent(1)), nullptr) << "the sink has not asked yet";
  v1::Event event;
  ASSERT_TRUE(queue.Next(sink.get(), &event));
  ASSERT_FALSE(queue.Next(sink.get(), &event));  // now waiting
  EXPECT_EQ(queue.Push(StateEvent(2)), sink);
  EXPECT_EQ(queue.Push(StateEvent(3)), nullptr) << "woken once, not per event";
}

TEST(EventQueueTest, ASlowConsumerIsToldWhatItLostThenGetsTheRest) {
  EventQueue queue(3);
  auto sink = std::make_shared<CountingSink>();
  ASSERT_TRUE(queue.Attach(sink).ok());
  for (uint64_t i = 1; i <= 5; ++i) queue.Push(StateEvent(i));
  EXPECT_EQ(queue.buffered(), 3u) << "memory stays bounded";
  EXPECT_EQ(queue.undelivered(), 3u);
  v1::Event event;
  ASSERT_TRUE(queue.Next(sink.get(), &event));
  ASSERT_TRUE(event.has_events_lost()) << event.DebugString();
  EXPECT_EQ(event.sequence(), 0u) << "the notice is not one of the app's events";
  EXPECT_EQ(event.events_lost().first_sequence(), 1u);
  EXPECT_EQ(event.events_lost().last_sequence(), 2u);
  EXPECT_EQ(queue.lost(), 2u);
  for (uint64_t i = 3; i <= 5; ++i) {
    ASSERT_TRUE(queue.Next(sink.get(), &event));
    EXPECT_EQ(event.sequence(), i);
  }
  EXPECT_FALSE(queue.Next(sink.get(), &event));
}

TEST(EventQueueTest, ReplaysDeliveredEventsFromARequestedSequence) {
  EventQueue queue(10);
  auto first = std::make_shared<CountingSink>();
  ASSERT_TRUE(queue.Attach(first).ok());
  for (uint64_t i = 1; i <= 4; ++i) queue.Push(StateEvent(i));
  v1::Event event;
  for (int i = 0; i < 4; ++i) ASSERT_TRUE(queue.Next(first.get(), &event));
  // The client saw only 1 and 2 before its connection broke.
  auto second = std::make_shared<CountingSink>();
  ASSERT_EQ(*queue.Attach(second, 3), first);
  for (uint64_t i = 3; i <= 4; ++i) {
    ASSERT_TRUE(queue.Next(second.get(), &event));
    EXPECT_EQ(event.sequence(), i);
    EXPECT_EQ(event.call_state().call_handle(), i);
  }
  EXPECT_FALSE(queue.Next(second.get(), &event));
  EXPECT_EQ(queue.lost(), 0u);
}

TEST(EventQueueTest, FromSequenceZeroContinuesWhereTheLastSinkStopped) {
  EventQueue queue(10);
  auto first = std::make_shared<CountingSink>();
  ASSERT_TRUE(queue.Attach(first).ok());
  queue.Push(StateEvent(1));
  v1::Event event;
  ASSERT_TRUE(queue.Next(first.get(), &event));
  queue.Detach(first.get());
  queue.Push(StateEvent(2));  // raised while no stream is open
  auto second = std::make_shared<CountingSink>();
  ASSERT_TRUE(queue.Attach(second).ok());
  ASSERT_TRUE(queue.Next(second.get(), &event));
  EXPECT_EQ(event.sequence(), 2u);
  EXPECT_FALSE(queue.Next(second.get(), &event));
}

TEST(EventQueueTest, ARequestedSequenceNoLongerBufferedIsReportedLost) {
  EventQueue queue(2);
  auto sink = std::make_shared<CountingSink>();
  for (uint64_t i = 1; i <= 5; ++i) queue.Push(StateEvent(i));
  ASSERT_TRUE(queue.Attach(sink, 2).ok());
  v1::Event event;
  ASSERT_TRUE(queue.Next(sink.get(), &event));
  ASSERT_TRUE(event.has_events_lost());
  EXPECT_EQ(event.events_lost().first_sequence(), 2u);
  EXPECT_EQ(event.events_lost().last_sequence(), 3u);
  ASSERT_TRUE(queue.Next(sink.get(), &event));
  EXPECT_EQ(event.sequence(), 4u);
}

TEST(EventQueueTest, ASequenceBeyondTheNextIsRefusedAndChangesNothing) {
  EventQueue queue(10);
  auto first = std::make_shared<CountingSink>();
  ASSERT_TRUE(queue.Attach(first).ok());
  queue.Push(StateEvent(1));
  auto second = std::make_shared<CountingSink>();
  EXPECT_EQ(queue.Attach(second, 3).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(queue.Attach(second, 2).ok()) << "the next sequence itself is fine";
  v1::Event event;
  EXPECT_FALSE(queue.Next(second.get(), &event)) << "nothing new yet";
}

TEST(EventQueueTest, OnlyTheCurrentSinkReceives) {
  EventQueue queue(10);
  auto first = std::make_shared<CountingSink>();
  auto second = std::make_shared<CountingSink>();
  ASSERT_TRUE(queue.Attach(first).ok());
  EXPECT_EQ(*queue.Attach(second), first) << "the replaced sink is returned to be ended";
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
  ASSERT_TRUE(queue.Attach(sink).ok());
  EXPECT_EQ(queue.Close(), sink);
  EXPECT_EQ(queue.Push(StateEvent(1)), nullptr);
  EXPECT_EQ(queue.buffered(), 0u);
  auto late = std::make_shared<CountingSink>();
  EXPECT_EQ(*queue.Attach(late), late) << "a closed queue refuses new sinks";
}

}  // namespace
}  // namespace callsession
