// The replicated store (--store=etcd): the core's Journal on an etcd
// cluster, with one leader at a time and hot standbys.
//
// Layout under the prefix P (default "/callsession/"):
//   P "r/" <record key>   each record of the journal (journal_records.h), as
//                         its own etcd key: etcd's keyspace is the state and
//                         its revision history is the journal
//   P "leader"            the leader's address, attached to its lease; its
//                         create_revision is the leader's epoch
//   P "epoch"             "<epoch> <address>", rewritten by every journal
//                         write: its history shows which leader wrote what
//   P "replicas/" <name>  each process's applied revision, on its lease
//
// Leadership: every process holds an etcd lease (`lease_ttl`), renewed
// every sixth of it. A process leads once it creates P "leader" (a Txn
// that requires it absent); it loses leadership when its lease ends
// (revoked at a planned handover, or expired after a kill, a pause or a
// partition). Every journal write is one Txn whose condition is that
// P "leader" still has this process's epoch as its create_revision: a
// former leader cannot write, so it cannot acknowledge. Besides, a leader
// serves only while its lease certainly holds (LeaderGate): renewals raise
// that deadline to the time the renewal was sent plus 90% of the TTL.
//
// Standbys: until it leads, a process keeps a copy of every record in
// memory, loaded with a paged linearizable read and kept current by a
// watch from the revision after it. When P "leader" is deleted, each
// standby tries to create it; the winner reads the watch up to its own
// P "leader" creation (everything any earlier leader wrote comes before
// it), and its Load visits that copy: no full read from etcd.
//
// Group commit: Append queues; one writer thread writes everything queued
// as Txns of at most `max_txn_ops` operations (never splitting an entry),
// one after another, in order, and marks each durable once etcd answers
// (etcd commits a Txn on a quorum of members, each fsyncing its log). An
// entry larger than one Txn is written as an intent (its operations under
// P "intent/"), committed, then applied in parts; a new leader finishes a
// committed intent it finds before it serves.
//
// Fail-stop: a write refused by the fence logs `leadership_lost` and exits
// with kLeadershipLostExitCode; so does a leader whose lease lapsed or
// whose writes failed for longer than it. Any other write error (e.g. an
// entry larger than etcd accepts) logs `journal_write_failed` and exits with
// kJournalFailureExitCode. A restarted process comes back as a standby.
//
// Retention: every 10 s the leader compacts etcd's history up to
// `retained_revisions` before the oldest revision every live process has
// applied; a standby that finds its watch compacted reloads its copy.
#ifndef CALLSESSION_SERVER_STORAGE_ETCD_ETCD_JOURNAL_H_
#define CALLSESSION_SERVER_STORAGE_ETCD_ETCD_JOURNAL_H_

#include <cstddef>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "server/core/journal.h"
#include "server/core/leadership.h"

namespace callsession {

// Exit status of a leader that lost its leadership (EX_TEMPFAIL).
inline constexpr int kLeadershipLostExitCode = 75;

struct EtcdJournalOptions {
  // host:port of each etcd member.
  std::vector<std::string> endpoints;
  // PEM files for TLS to etcd; an empty ca_file: plaintext.
  std::string ca_file;
  std::string cert_file;
  std::string key_file;
  // Every key lives under it; one prefix per callsession deployment.
  std::string prefix = "/callsession/";
  // The lease: a killed leader is replaced after at most about this long.
  // At least 2 s (etcd's minimum for its default timing is 1.5 s).
  absl::Duration lease_ttl = absl::Seconds(3);
  // host:port clients reach this process on: what a standby names as the
  // leader. Required.
  std::string advertise_address;
  // This process's name among the replicas (the pod name); required.
  std::string member_name;
  // Operations per Txn: etcd's --max-txn-ops (default 128) or less. An entry
  // with more (an application with many calls shutting down) is written as
  // an intent and applied in parts (see etcd_journal.cc, large entries).
  size_t max_txn_ops = 128;
  // Revisions of etcd's history kept behind the oldest one every live
  // replica has applied (what a standby that reconnects resumes from, and
  // what an audit of the epochs reads); older ones are compacted.
  int64_t retained_revisions = 100000;
  // (Each etcd call's deadline is a quarter of the lease, so that a member
  // that hangs, having lost its own leader, leaves time to try another
  // before the lease runs out.)
};

// Connects to etcd, becomes a standby, and returns once this process leads
// and has applied every record written before: the journal the core then
// loads and writes. Blocks until then (forever if another process leads
// and stays healthy); while it waits, `gate` names the leader. `gate` must
// outlive the journal. Errors: INVALID_ARGUMENT for bad options or
// unreadable TLS files. etcd being unreachable is not an error: it logs
// `etcd_unreachable` and keeps trying.
//
// The journal's destructor writes what is queued, then revokes the lease
// (a planned handover: a standby takes over at once).
absl::StatusOr<std::unique_ptr<Journal>> OpenEtcdJournal(const EtcdJournalOptions& options,
                                                         LeaderGate* gate);

}  // namespace callsession

#endif  // CALLSESSION_SERVER_STORAGE_ETCD_ETCD_JOURNAL_H_
