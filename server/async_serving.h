// AsyncServing: the RPCs of CallSessionService and ProviderService, served
// through gRPC's completion-queue API on serving threads of its own, so
// that the thread that reads a burst of requests also writes their changes
// to the journal and sends their replies.
//
// Each serving thread owns one completion queue. It takes what its queue
// holds, up to kMaxBurst events without waiting (a burst), runs each
// request on the core, and sends a reply at once when nothing waits for the
// journal (reads; the memory store; a change already durable). Before it
// waits again it writes the burst's changes itself (CallerWritesScope,
// CallSessionCore::WriteChangesNow) and sends the replies that made
// durable: one batch per burst, and no other thread between a request and
// its reply. With RocksDB's sync, a thread that is not the only serving
// thread syncs its burst too (while the others serve), and sends the
// replies of every burst that sync covered; the only serving thread leaves
// the sync to the journal's threads, which then send the replies, so that
// a sync never stops all serving. Replies waiting for etcd, which writes
// on its own, are sent from its threads. Either way no reply leaves before
// its change is durable.
//
// No service of the server may use gRPC's callback API: its threads would
// poll the connections too, and hand most requests over to these threads
// (measured: three reads in four). Health and admin use the synchronous
// API, whose threads do not.
//
// Lifecycle: construct; add the methods (AddUnary, AddAwaiter) and the
// queues (AddCompletionQueues) before the server is built; Start once it
// is; Shutdown once grpc::Server::Shutdown has returned. The services and
// the serving core must outlive it.
#ifndef CALLSESSION_SERVER_ASYNC_SERVING_H_
#define CALLSESSION_SERVER_ASYNC_SERVING_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "grpcpp/completion_queue.h"
#include "grpcpp/server_builder.h"
#include "grpcpp/server_context.h"
#include "grpcpp/support/async_unary_call.h"
#include "server/core/call_session_core.h"
#include "server/grpc_edge.h"
#include "server/serving_core.h"

namespace callsession {

class AsyncServing {
  template <typename T>
  struct Identity {
    using type = T;
  };

 public:
  // Events a thread takes before it writes and replies, however many more
  // are queued: bounds how long a reply waits for the rest of its burst.
  static constexpr int kMaxBurst = 64;

  // The replies of one serving thread's burst that wait for the journal.
  // Used only by that thread.
  class Burst {
   public:
    explicit Burst(const ServingCore& serving) : serving_(serving) {}
    const ServingCore& serving() const { return serving_; }
    // Sends `status` through `finish` now if the changes made so far are
    // durable, else once End has written them (or the journal has).
    void ReplyWhenDurable(CallSessionCore& core, grpc::Status status,
                          std::function<void(const grpc::Status&)> finish);
    // Notes that a request ran on `core`: it may have appended changes.
    void Ran(CallSessionCore& core) { core_ = &core; }
    // Writes what the burst appended (if the journal can) and sends every
    // reply that made durable; the others are sent from the journal's
    // thread once durable.
    void End();

   private:
    struct Pending {
      CallSessionCore* core;
      uint64_t barrier;
      grpc::Status status;
      std::function<void(const grpc::Status&)> finish;
    };
    const ServingCore& serving_;
    CallSessionCore* core_ = nullptr;
    std::vector<Pending> pending_;
  };

  // A completion-queue tag: every tag on these queues is one.
  class Tag {
   public:
    // `ok` as the queue reported it; on the thread that owns the queue.
    virtual void Proceed(bool ok, Burst& burst) = 0;

   protected:
    ~Tag() = default;
  };

  // Runs one request on the core and fills the response.
  template <typename Request, typename Response>
  using Handler = std::function<absl::Status(CallSessionCore&, grpc::ServerContext&, const Request&,
                                             Response*)>;

  // `threads`: serving threads (and completion queues); at least one.
  AsyncServing(const ServingCore* serving, int threads);
  ~AsyncServing();

  // Serves the unary method whose generated Request<Method> is `request`,
  // with `handler`; `reply` says when its replies may leave. Before Start.
  template <typename Service, typename Base, typename Request, typename Response>
  void AddUnary(Service* service,
                void (Base::*request)(grpc::ServerContext*, Request*,
                                      grpc::ServerAsyncResponseWriter<Response>*,
                                      grpc::CompletionQueue*, grpc::ServerCompletionQueue*, void*),
                Reply reply, typename Identity<Handler<Request, Response>>::type handler) {
    auto method = std::make_shared<UnaryMethod<Request, Response>>();
    Base* base = service;
    method->request = [base, request](grpc::ServerContext* context, Request* message,
                                      grpc::ServerAsyncResponseWriter<Response>* writer,
                                      grpc::ServerCompletionQueue* queue, Tag* tag) {
      (base->*request)(context, message, writer, queue, queue, tag);
    };
    method->reply = reply;
    method->handler = std::move(handler);
    AddAwaiter([method](grpc::ServerCompletionQueue* queue) {
      new UnaryCall<Request, Response>(method, queue);
    });
  }

  // For other kinds of calls: `await` asks for one call on the queue, with
  // a Tag of its own; once that call arrives, the tag asks for the next
  // one. Called for each queue, several times, at Start. Before Start.
  void AddAwaiter(std::function<void(grpc::ServerCompletionQueue*)> await) {
    awaiters_.push_back(std::move(await));
  }

  // Adds this object's completion queues to `builder`. Before it builds.
  void AddCompletionQueues(grpc::ServerBuilder& builder);

  // Asks for the first calls of every method and starts the threads.
  void Start();

  // Shuts the queues down, drains them and joins the threads. After the
  // server's Shutdown has returned.
  void Shutdown();

  // Calls of these methods that have arrived (their tag was taken) and not
  // yet ended (their reply or status sent, or the call cancelled). Any
  // thread.
  int64_t CallsInProgress() const;

  // For the calls of an AddAwaiter method: notes a call's arrival, and its
  // end. Each on the serving thread that took the call's tag (a call's tags
  // all come back to its own queue).
  static void NoteCallArrived();
  static void NoteCallEnded();

 private:
  template <typename Request, typename Response>
  struct UnaryMethod {
    std::function<void(grpc::ServerContext*, Request*, grpc::ServerAsyncResponseWriter<Response>*,
                       grpc::ServerCompletionQueue*, Tag*)>
        request;
    Reply reply = Reply::kWhenDurable;
    Handler<Request, Response> handler;
  };

  // One unary call, from its arrival to its reply's completion; owns itself.
  template <typename Request, typename Response>
  class UnaryCall final : public Tag {
   public:
    UnaryCall(std::shared_ptr<const UnaryMethod<Request, Response>> method,
              grpc::ServerCompletionQueue* queue)
        : method_(std::move(method)), queue_(queue), writer_(&context_) {
      method_->request(&context_, &request_, &writer_, queue_, this);
    }

    void Proceed(bool ok, Burst& burst) override {
      if (finishing_ || !ok) {  // replied, or the queue is shutting down
        // Once arrived, the tag comes back only from Finish.
        if (finishing_) NoteCallEnded();
        delete this;
        return;
      }
      NoteCallArrived();
      new UnaryCall(method_, queue_);  // the next call of this method
      absl::StatusOr<CallSessionCore*> core = burst.serving().Get();
      if (!core.ok()) return Finish(ToGrpcStatus(core.status()));
      burst.Ran(**core);
      const absl::Status status = method_->handler(**core, context_, request_, &response_);
      if (status.code() == absl::StatusCode::kUnauthenticated) {
        LogAuthenticationFailure(context_, status);
      }
      if (method_->reply == Reply::kAtOnce) return Finish(ToGrpcStatus(status));
      burst.ReplyWhenDurable(**core, ToGrpcStatus(status),
                             [this](const grpc::Status& reply) { Finish(reply); });
    }

   private:
    ~UnaryCall() = default;

    void Finish(const grpc::Status& status) {
      finishing_ = true;
      writer_.Finish(response_, status, static_cast<Tag*>(this));
    }

    const std::shared_ptr<const UnaryMethod<Request, Response>> method_;
    grpc::ServerCompletionQueue* const queue_;
    grpc::ServerContext context_;
    Request request_;
    Response response_;
    grpc::ServerAsyncResponseWriter<Response> writer_;
    bool finishing_ = false;
  };

  // The calls in progress on one queue; written only by its serving
  // thread, so that counting them costs no shared cache line.
  struct alignas(64) QueueCalls {
    std::atomic<int64_t> in_progress{0};
  };

  void Serve(grpc::ServerCompletionQueue* queue, QueueCalls* calls);

  const ServingCore& serving_;
  const int thread_count_;
  std::vector<std::function<void(grpc::ServerCompletionQueue*)>> awaiters_;
  std::vector<std::unique_ptr<grpc::ServerCompletionQueue>> queues_;
  // One per queue, in the same order.
  std::vector<std::unique_ptr<QueueCalls>> queue_calls_;
  std::vector<std::thread> threads_;
};

}  // namespace callsession

#endif  // CALLSESSION_SERVER_ASYNC_SERVING_H_
