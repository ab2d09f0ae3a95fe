#include "server/async_serving.h"

#include <pthread.h>

#include <algorithm>
#include <string>

#include "absl/strings/str_cat.h"
#include "grpc/support/time.h"
#include "server/core/journal.h"

namespace callsession {
namespace {

// Calls of each method asked for ahead on each queue: a request that
// arrives when none is waiting is held by gRPC until one is.
constexpr int kAwaitedPerMethod = 16;

// The calls-in-progress count of the queue this serving thread serves.
thread_local std::atomic<int64_t>* this_thread_calls = nullptr;

// Only this thread writes the count: a plain load and store, no locked
// instruction.
void AddToThisThreadsCalls(int64_t delta) {
  this_thread_calls->store(this_thread_calls->load(std::memory_order_relaxed) + delta,
                           std::memory_order_relaxed);
}

}  // namespace

AsyncServing::AsyncServing(const ServingCore* serving, int threads)
    : serving_(*serving), thread_count_(std::max(threads, 1)) {}

AsyncServing::~AsyncServing() {
  if (!threads_.empty()) Shutdown();
}

void AsyncServing::AddCompletionQueues(grpc::ServerBuilder& builder) {
  for (int i = 0; i < thread_count_; ++i) {
    queues_.push_back(builder.AddCompletionQueue());
    queue_calls_.push_back(std::make_unique<QueueCalls>());
  }
}

void AsyncServing::Start() {
  for (auto& queue : queues_) {
    for (auto& await : awaiters_) {
      for (int i = 0; i < kAwaitedPerMethod; ++i) await(queue.get());
    }
  }
  for (size_t i = 0; i < queues_.size(); ++i) {
    threads_.emplace_back(
        [this, queue = queues_[i].get(), calls = queue_calls_[i].get()] { Serve(queue, calls); });
    // Named for top -H, perf and /proc/PID/task/*/comm (15 characters).
    const std::string name = absl::StrCat("serving-", threads_.size() - 1);
    pthread_setname_np(threads_.back().native_handle(), name.substr(0, 15).c_str());
  }
}

void AsyncServing::Shutdown() {
  for (auto& queue : queues_) queue->Shutdown();
  for (std::thread& thread : threads_) thread.join();
  threads_.clear();
}

int64_t AsyncServing::CallsInProgress() const {
  int64_t calls = 0;
  for (const auto& queue : queue_calls_)
    calls += queue->in_progress.load(std::memory_order_relaxed);
  return calls;
}

void AsyncServing::NoteCallArrived() { AddToThisThreadsCalls(1); }

void AsyncServing::NoteCallEnded() { AddToThisThreadsCalls(-1); }

void AsyncServing::Serve(grpc::ServerCompletionQueue* queue, QueueCalls* calls) {
  this_thread_calls = &calls->in_progress;
  // Syncing here spares a wake-up of a journal thread (on another CPU, when
  // the cores are shared: measured in BENCHMARKS.md), but blocks this queue
  // for the sync: only worth it while other threads serve.
  CallerWritesScope caller_writes(/*also_sync=*/thread_count_ > 1);
  Burst burst(serving_);
  void* tag = nullptr;
  bool ok = false;
  while (queue->Next(&tag, &ok)) {
    static_cast<Tag*>(tag)->Proceed(ok, burst);
    // The rest of what is queued, without waiting.
    for (int taken = 1; taken < kMaxBurst; ++taken) {
      if (queue->AsyncNext(&tag, &ok, gpr_time_0(GPR_CLOCK_MONOTONIC)) !=
          grpc::CompletionQueue::GOT_EVENT) {
        break;
      }
      static_cast<Tag*>(tag)->Proceed(ok, burst);
    }
    burst.End();
  }
}

void AsyncServing::Burst::ReplyWhenDurable(CallSessionCore& core, grpc::Status status,
                                           std::function<void(const grpc::Status&)> finish) {
  const uint64_t barrier = core.ChangesBarrier();
  if (core.IsDurable(barrier)) return finish(status);
  pending_.push_back(Pending{&core, barrier, std::move(status), std::move(finish)});
}

void AsyncServing::Burst::End() {
  if (core_ == nullptr) return;
  // Also when no reply waits: a request answered at once may have appended
  // (a lease renewal), and what this thread appends nobody else writes.
  core_->WriteChangesNow();
  core_ = nullptr;
  for (Pending& pending : pending_) {
    if (pending.core->IsDurable(pending.barrier)) {
      pending.finish(pending.status);
    } else {
      pending.core->WhenDurable(pending.barrier,
                                [finish = std::move(pending.finish),
                                 status = std::move(pending.status)]() { finish(status); });
    }
  }
  pending_.clear();
}

}  // namespace callsession
