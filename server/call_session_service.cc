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
// queue runs dry it waits for EventSink::OnEventsAvailable. Finish is only
// ever called with no write in flight, so gRPC cannot run OnDone (and the
// reactor cannot be released) between our decision to write and StartWrite.
//
// Ownership: the reactor owns itself through self_ from creation to OnDone;
// the event queue may hold further references, which keep a finished
// reactor's memory valid but never write again.
class WatchEventsReactor final : public grpc::ServerWriteReactor<v1::WatchEventsResponse>,
                                 public EventSink {
 public:
  static grpc::ServerWriteReactor<v1::WatchEventsResponse>* Start(
      const grpc::CallbackServerContext* context, const ServingCore& serving,
      absl::string_view token, const v1::WatchEventsRequest& request) {
    auto reactor = std::make_shared<WatchEventsReactor>();
    {
      absl::MutexLock lock(&reactor->mu_);
      reactor->self_ = reactor;
    }
    absl::StatusOr<CallSessionCore*> core = serving.Get();
    absl::StatusOr<std::unique_ptr<EventSubscription>> subscription =
        core.ok() ? (*core)->WatchEvents(token, request, reactor) : core.status();
    if (!subscription.ok()) {
      if (subscription.status().code() == absl::StatusCode::kUnauthenticated) {
        LogAuthenticationFailure(*context, subscription.status());
      }
      reactor->End(ToGrpcStatus(subscription.status()));
    } else {
      {
        absl::MutexLock lock(&reactor->mu_);
        reactor->subscription_ = *std::move(subscription);
      }
      reactor->Pump();
    }
    return reactor.get();
  }

  void OnEventsAvailable() override { Pump(); }

  void OnSubscriptionEnded(const absl::Status& why) override { End(ToGrpcStatus(why)); }

  void OnWriteDone(bool ok) override {
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
      Finish(*finish);
      return;
    }
    Pump();
  }

  void OnCancel() override {
    End(grpc::Status(grpc::StatusCode::CANCELLED, "cancelled by the client"));
  }

  void OnDone() override {
    std::unique_ptr<EventSubscription> subscription;
    std::shared_ptr<WatchEventsReactor> self;
    {
      absl::MutexLock lock(&mu_);
      subscription = std::move(subscription_);
      self = std::move(self_);
    }
    // `self` may be the last reference: nothing may touch members below.
  }

 private:
  void Pump() {
    {
      absl::MutexLock lock(&mu_);
      if (finished_ || writing_ || subscription_ == nullptr) return;
      if (!subscription_->Next(response_.mutable_event())) return;
      writing_ = true;
    }
    StartWrite(&response_);
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
    if (finish.has_value()) Finish(*finish);
  }

  std::optional<grpc::Status> TakePendingFinishLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (finished_ || !pending_finish_.has_value()) return std::nullopt;
    finished_ = true;
    return std::exchange(pending_finish_, std::nullopt);
  }

  absl::Mutex mu_;
  std::shared_ptr<WatchEventsReactor> self_ ABSL_GUARDED_BY(mu_);
  std::unique_ptr<EventSubscription> subscription_ ABSL_GUARDED_BY(mu_);
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  std::optional<grpc::Status> pending_finish_ ABSL_GUARDED_BY(mu_);
  // Written only while no write is in flight (writing_ false, under mu_).
  v1::WatchEventsResponse response_;
};

}  // namespace

grpc::ServerUnaryReactor* CallSessionGrpcService::Initialize(grpc::CallbackServerContext* context,
                                                             const v1::InitializeRequest* request,
                                                             v1::InitializeResponse* response) {
  return Respond(context, serving_, Reply::kWhenDurable, [&](CallSessionCore& core) {
    return core.Initialize(CallerCredentials(*context), *request, response);
  });
}

grpc::ServerUnaryReactor* CallSessionGrpcService::Shutdown(grpc::CallbackServerContext* context,
                                                           const v1::ShutdownRequest* request,
                                                           v1::ShutdownResponse* response) {
  return Respond(context, serving_, Reply::kWhenDurable, [&](CallSessionCore& core) {
    return core.Shutdown(BearerToken(*context), *request, response);
  });
}

grpc::ServerUnaryReactor* CallSessionGrpcService::LineOpen(grpc::CallbackServerContext* context,
                                                           const v1::LineOpenRequest* request,
                                                           v1::LineOpenResponse* response) {
  return Respond(context, serving_, Reply::kWhenDurable, [&](CallSessionCore& core) {
    return core.LineOpen(BearerToken(*context), *request, response);
  });
}

grpc::ServerUnaryReactor* CallSessionGrpcService::LineClose(grpc::CallbackServerContext* context,
                                                            const v1::LineCloseRequest* request,
                                                            v1::LineCloseResponse* response) {
  return Respond(context, serving_, Reply::kWhenDurable, [&](CallSessionCore& core) {
    return core.LineClose(BearerToken(*context), *request, response);
  });
}

grpc::ServerUnaryReactor* CallSessionGrpcService::MakeCall(grpc::CallbackServerContext* context,
                                                           const v1::MakeCallRequest* request,
                                                           v1::MakeCallResponse* response) {
  return Respond(context, serving_, Reply::kWhenDurable, [&](CallSessionCore& core) {
    return core.MakeCall(BearerToken(*context), *request, response);
  });
}

grpc::ServerUnaryReactor* CallSessionGrpcService::Answer(grpc::CallbackServerContext* context,
                                                         const v1::AnswerRequest* request,
                                                         v1::AnswerResponse* response) {
  return Respond(context, serving_, Reply::kWhenDurable, [&](CallSessionCore& core) {
    return core.Answer(BearerToken(*context), *request, response);
  });
}

grpc::ServerUnaryReactor* CallSessionGrpcService::Drop(grpc::CallbackServerContext* context,
                                                       const v1::DropRequest* request,
                                                       v1::DropResponse* response) {
  return Respond(context, serving_, Reply::kWhenDurable, [&](CallSessionCore& core) {
    return core.Drop(BearerToken(*context), *request, response);
  });
}

grpc::ServerUnaryReactor* CallSessionGrpcService::GetCallInfo(grpc::CallbackServerContext* context,
                                                              const v1::GetCallInfoRequest* request,
                                                              v1::GetCallInfoResponse* response) {
  return Respond(context, serving_, Reply::kAtOnce, [&](CallSessionCore& core) {
    return core.GetCallInfo(BearerToken(*context), *request, response);
  });
}

grpc::ServerUnaryReactor* CallSessionGrpcService::GetCallStatus(
    grpc::CallbackServerContext* context, const v1::GetCallStatusRequest* request,
    v1::GetCallStatusResponse* response) {
  return Respond(context, serving_, Reply::kAtOnce, [&](CallSessionCore& core) {
    return core.GetCallStatus(BearerToken(*context), *request, response);
  });
}

grpc::ServerUnaryReactor* CallSessionGrpcService::DeallocateCall(
    grpc::CallbackServerContext* context, const v1::DeallocateCallRequest* request,
    v1::DeallocateCallResponse* response) {
  return Respond(context, serving_, Reply::kWhenDurable, [&](CallSessionCore& core) {
    return core.DeallocateCall(BearerToken(*context), *request, response);
  });
}

grpc::ServerUnaryReactor* CallSessionGrpcService::GetNewCalls(grpc::CallbackServerContext* context,
                                                              const v1::GetNewCallsRequest* request,
                                                              v1::GetNewCallsResponse* response) {
  return Respond(context, serving_, Reply::kWhenDurable, [&](CallSessionCore& core) {
    return core.GetNewCalls(BearerToken(*context), *request, response);
  });
}

grpc::ServerUnaryReactor* CallSessionGrpcService::ListCalls(grpc::CallbackServerContext* context,
                                                            const v1::ListCallsRequest* request,
                                                            v1::ListCallsResponse* response) {
  return Respond(context, serving_, Reply::kAtOnce, [&](CallSessionCore& core) {
    return core.ListCalls(BearerToken(*context), *request, response);
  });
}

grpc::ServerUnaryReactor* CallSessionGrpcService::KeepAlive(grpc::CallbackServerContext* context,
                                                            const v1::KeepAliveRequest* request,
                                                            v1::KeepAliveResponse* response) {
  return Respond(context, serving_, Reply::kAtOnce, [&](CallSessionCore& core) {
    return core.KeepAlive(BearerToken(*context), *request, response);
  });
}

grpc::ServerWriteReactor<v1::WatchEventsResponse>* CallSessionGrpcService::WatchEvents(
    grpc::CallbackServerContext* context, const v1::WatchEventsRequest* request) {
  return WatchEventsReactor::Start(context, serving_, BearerToken(*context), *request);
}

}  // namespace callsession
