#include "server/call_session_service.h"

#include <memory>
#include <optional>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "server/grpc_edge.h"

namespace callsession {
namespace {

// Streams one application's events: at most one write in flight; when the
// queue runs dry it waits for EventSink::OnEventsAvailable, which may come
// on any thread (a write may start there). Finish is only ever started with
// no write in flight.
//
// Ownership: the call owns itself through self_ from its request until both
// its finish and gRPC's done notification have come back (or its request
// failed: no done notification then); the event queue may hold further
// references, which keep a finished call's memory valid but never write.
class WatchEventsCall final : public EventSink,
                              public std::enable_shared_from_this<WatchEventsCall> {
 public:
  // Asks for the next WatchEvents call on `queue`.
  static void Await(CallSessionGrpcService* service, const ServingCore* serving,
                    grpc::ServerCompletionQueue* queue) {
    auto call = std::make_shared<WatchEventsCall>(service, serving, queue);
    {
      absl::MutexLock lock(&call->mu_);
      call->self_ = call;
    }
    call->context_.AsyncNotifyWhenDone(static_cast<AsyncServing::Tag*>(&call->done_));
    service->RequestWatchEvents(&call->context_, &call->request_, &call->writer_, queue, queue,
                                static_cast<AsyncServing::Tag*>(&call->started_));
  }

  WatchEventsCall(CallSessionGrpcService* service, const ServingCore* serving,
                  grpc::ServerCompletionQueue* queue)
      : service_(service), serving_(*serving), queue_(queue), writer_(&context_) {}

  void OnEventsAvailable() override { Pump(); }

  void OnSubscriptionEnded(const absl::Status& why) override { End(ToGrpcStatus(why)); }

 private:
  // One of the call's completion-queue tags.
  class Step final : public AsyncServing::Tag {
   public:
    using Handler = void (WatchEventsCall::*)(bool ok);
    Step(WatchEventsCall* call, Handler handler) : call_(call), handler_(handler) {}
    void Proceed(bool ok, AsyncServing::Burst& /*burst*/) override { (call_->*handler_)(ok); }

   private:
    WatchEventsCall* const call_;
    const Handler handler_;
  };

  void OnStarted(bool ok) {
    if (!ok) {  // the queue is shutting down: no call came
      Release();
      return;
    }
    arrived_ = true;
    AsyncServing::NoteCallArrived();
    Await(service_, &serving_, queue_);
    const std::string token(BearerToken(context_));
    absl::StatusOr<CallSessionCore*> core = serving_.Get();
    absl::StatusOr<std::unique_ptr<EventSubscription>> subscription =
        core.ok() ? (*core)->WatchEvents(token, request_, shared_from_this()) : core.status();
    if (!subscription.ok()) {
      if (subscription.status().code() == absl::StatusCode::kUnauthenticated) {
        LogAuthenticationFailure(context_, subscription.status());
      }
      End(ToGrpcStatus(subscription.status()));
      return;
    }
    {
      absl::MutexLock lock(&mu_);
      subscription_ = *std::move(subscription);
    }
    Pump();
  }

  void OnWritten(bool ok) {
    std::optional<grpc::Status> finish;
    {
      absl::MutexLock lock(&mu_);
      writing_ = false;
      if (!ok) {
        pending_finish_ = grpc::Status(grpc::StatusCode::CANCELLED, "the event stream broke");
      }
      finish = TakePendingFinishLocked();
    }
    if (finish.has_value()) {
      writer_.Finish(*finish, static_cast<AsyncServing::Tag*>(&finished_step_));
      return;
    }
    Pump();
  }

  void OnFinished(bool /*ok*/) {
    bool release;
    {
      absl::MutexLock lock(&mu_);
      finish_done_ = true;
      release = done_notified_;
    }
    if (release) Release();
  }

  void OnDone(bool /*ok*/) {
    if (context_.IsCancelled()) {
      End(grpc::Status(grpc::StatusCode::CANCELLED, "cancelled by the client"));
    }
    bool release;
    {
      absl::MutexLock lock(&mu_);
      done_notified_ = true;
      release = finish_done_;
    }
    if (release) Release();
  }

  void Pump() {
    {
      absl::MutexLock lock(&mu_);
      if (finished_ || writing_ || subscription_ == nullptr) return;
      if (!subscription_->Next(response_.mutable_event())) return;
      writing_ = true;
    }
    writer_.Write(response_, static_cast<AsyncServing::Tag*>(&written_));
  }

  // Finishes now, or after the write in flight completes.
  void End(grpc::Status status) {
    std::optional<grpc::Status> finish;
    {
      absl::MutexLock lock(&mu_);
      if (finished_ || pending_finish_.has_value()) return;
      pending_finish_ = std::move(status);
      if (writing_) return;
      finish = TakePendingFinishLocked();
    }
    if (finish.has_value())
      writer_.Finish(*finish, static_cast<AsyncServing::Tag*>(&finished_step_));
  }

  std::optional<grpc::Status> TakePendingFinishLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (finished_ || !pending_finish_.has_value()) return std::nullopt;
    finished_ = true;
    return std::exchange(pending_finish_, std::nullopt);
  }

  // Ends the subscription and drops the call's own reference. On the
  // serving thread (from a tag).
  void Release() {
    if (arrived_) AsyncServing::NoteCallEnded();
    std::unique_ptr<EventSubscription> subscription;
    std::shared_ptr<WatchEventsCall> self;
    {
      absl::MutexLock lock(&mu_);
      subscription = std::move(subscription_);
      self = std::move(self_);
    }
    // `self` may be the last reference: nothing may touch members below.
  }

  CallSessionGrpcService* const service_;
  const ServingCore& serving_;
  grpc::ServerCompletionQueue* const queue_;
  grpc::ServerContext context_;
  v1::WatchEventsRequest request_;
  grpc::ServerAsyncWriter<v1::WatchEventsResponse> writer_;
  Step started_{this, &WatchEventsCall::OnStarted};
  Step written_{this, &WatchEventsCall::OnWritten};
  Step finished_step_{this, &WatchEventsCall::OnFinished};
  Step done_{this, &WatchEventsCall::OnDone};

  absl::Mutex mu_;
  std::shared_ptr<WatchEventsCall> self_ ABSL_GUARDED_BY(mu_);
  std::unique_ptr<EventSubscription> subscription_ ABSL_GUARDED_BY(mu_);
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  std::optional<grpc::Status> pending_finish_ ABSL_GUARDED_BY(mu_);
  bool finish_done_ ABSL_GUARDED_BY(mu_) = false;
  bool done_notified_ ABSL_GUARDED_BY(mu_) = false;
  // Read and written only on the serving thread.
  bool arrived_ = false;
  // Written only while no write is in flight (writing_ false, under mu_).
  v1::WatchEventsResponse response_;
};

}  // namespace

void CallSessionGrpcService::ServeThrough(AsyncServing& serving) {
  serving.AddAwaiter([this](grpc::ServerCompletionQueue* queue) {
    WatchEventsCall::Await(this, &serving_, queue);
  });
  serving.AddUnary(this, &CallSessionGrpcService::RequestInitialize, Reply::kWhenDurable,
                   [](CallSessionCore& core, grpc::ServerContext& context,
                      const v1::InitializeRequest& request, v1::InitializeResponse* response) {
                     return core.Initialize(CallerCredentials(context), request, response);
                   });
  serving.AddUnary(this, &CallSessionGrpcService::RequestShutdown, Reply::kWhenDurable,
                   [](CallSessionCore& core, grpc::ServerContext& context,
                      const v1::ShutdownRequest& request, v1::ShutdownResponse* response) {
                     return core.Shutdown(BearerToken(context), request, response);
                   });
  serving.AddUnary(this, &CallSessionGrpcService::RequestLineOpen, Reply::kWhenDurable,
                   [](CallSessionCore& core, grpc::ServerContext& context,
                      const v1::LineOpenRequest& request, v1::LineOpenResponse* response) {
                     return core.LineOpen(BearerToken(context), request, response);
                   });
  serving.AddUnary(this, &CallSessionGrpcService::RequestLineClose, Reply::kWhenDurable,
                   [](CallSessionCore& core, grpc::ServerContext& context,
                      const v1::LineCloseRequest& request, v1::LineCloseResponse* response) {
                     return core.LineClose(BearerToken(context), request, response);
                   });
  serving.AddUnary(this, &CallSessionGrpcService::RequestMakeCall, Reply::kWhenDurable,
                   [](CallSessionCore& core, grpc::ServerContext& context,
                      const v1::MakeCallRequest& request, v1::MakeCallResponse* response) {
                     return core.MakeCall(BearerToken(context), request, response);
                   });
  serving.AddUnary(this, &CallSessionGrpcService::RequestAnswer, Reply::kWhenDurable,
                   [](CallSessionCore& core, grpc::ServerContext& context,
                      const v1::AnswerRequest& request, v1::AnswerResponse* response) {
                     return core.Answer(BearerToken(context), request, response);
                   });
  serving.AddUnary(this, &CallSessionGrpcService::RequestDrop, Reply::kWhenDurable,
                   [](CallSessionCore& core, grpc::ServerContext& context,
                      const v1::DropRequest& request, v1::DropResponse* response) {
                     return core.Drop(BearerToken(context), request, response);
                   });
  serving.AddUnary(this, &CallSessionGrpcService::RequestGetCallInfo, Reply::kAtOnce,
                   [](CallSessionCore& core, grpc::ServerContext& context,
                      const v1::GetCallInfoRequest& request, v1::GetCallInfoResponse* response) {
                     return core.GetCallInfo(BearerToken(context), request, response);
                   });
  serving.AddUnary(
      this, &CallSessionGrpcService::RequestGetCallStatus, Reply::kAtOnce,
      [](CallSessionCore& core, grpc::ServerContext& context,
         const v1::GetCallStatusRequest& request, v1::GetCallStatusResponse* response) {
        return core.GetCallStatus(BearerToken(context), request, response);
      });
  serving.AddUnary(
      this, &CallSessionGrpcService::RequestDeallocateCall, Reply::kWhenDurable,
      [](CallSessionCore& core, grpc::ServerContext& context,
         const v1::DeallocateCallRequest& request, v1::DeallocateCallResponse* response) {
        return core.DeallocateCall(BearerToken(context), request, response);
      });
  serving.AddUnary(this, &CallSessionGrpcService::RequestGetNewCalls, Reply::kWhenDurable,
                   [](CallSessionCore& core, grpc::ServerContext& context,
                      const v1::GetNewCallsRequest& request, v1::GetNewCallsResponse* response) {
                     return core.GetNewCalls(BearerToken(context), request, response);
                   });
  serving.AddUnary(this, &CallSessionGrpcService::RequestListCalls, Reply::kAtOnce,
                   [](CallSessionCore& core, grpc::ServerContext& context,
                      const v1::ListCallsRequest& request, v1::ListCallsResponse* response) {
                     return core.ListCalls(BearerToken(context), request, response);
                   });
  serving.AddUnary(this, &CallSessionGrpcService::RequestKeepAlive, Reply::kAtOnce,
                   [](CallSessionCore& core, grpc::ServerContext& context,
                      const v1::KeepAliveRequest& request, v1::KeepAliveResponse* response) {
                     return core.KeepAlive(BearerToken(context), request, response);
                   });
}

}  // namespace callsession
