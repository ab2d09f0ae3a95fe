// RefPtr: an intrusively reference-counted pointer, 8 bytes where a
// shared_ptr is 16 plus a control block. Used for call records, which the
// handle tables hold by the million (see BENCHMARKS.md, Memory).
//
// T must have a member `std::atomic<uint32_t> refs` starting at 0. Copies
// may be made and destroyed concurrently from any thread.
#ifndef CALLSESSION_SERVER_CORE_REF_PTR_H_
#define CALLSESSION_SERVER_CORE_REF_PTR_H_

#include <atomic>
#include <cstdint>
#include <utility>

namespace callsession {

template <typename T>
class RefPtr {
 public:
  RefPtr() = default;
  RefPtr(std::nullptr_t) {}  // NOLINT: like shared_ptr
  RefPtr(const RefPtr& other) : ptr_(other.ptr_) { Acquire(); }
  RefPtr(RefPtr&& other) noexcept : ptr_(std::exchange(other.ptr_, nullptr)) {}
  RefPtr& operator=(RefPtr other) noexcept {
    std::swap(ptr_, other.ptr_);
    return *this;
  }
  ~RefPtr() { Drop(); }

  // Takes the first reference to a new object.
  template <typename... Args>
  static RefPtr Make(Args&&... args) {
    RefPtr result;
    result.ptr_ = new T(std::forward<Args>(args)...);
    result.Acquire();
    return result;
  }

  T* get() const { return ptr_; }
  T& operator*() const { return *ptr_; }
  T* operator->() const { return ptr_; }
  explicit operator bool() const { return ptr_ != nullptr; }
  bool operator==(std::nullptr_t) const { return ptr_ == nullptr; }
  bool operator!=(std::nullptr_t) const { return ptr_ != nullptr; }

 private:
  void Acquire() {
    if (ptr_ != nullptr) ptr_->refs.fetch_add(1, std::memory_order_relaxed);
  }
  void Drop() {
    // acq_rel: the last owner must see every other owner's writes before
    // it destroys the object.
    if (ptr_ != nullptr && ptr_->refs.fetch_sub(1, std::memory_order_acq_rel) == 1) delete ptr_;
  }

  T* ptr_ = nullptr;
};

}  // namespace callsession

#endif  // CALLSESSION_SERVER_CORE_REF_PTR_H_
