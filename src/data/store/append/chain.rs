//! The chain of batches one stream's writer has decided but not yet seen commit, so that the
//! next batch is decided on top of them while they commit (see the parent module).

use std::collections::HashMap;
use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::watch;

use super::AppendInput;
use super::Appended;
use super::decide::{Decided, Known, decide};
use crate::poison::MutexExt;

/// Committed links an [`AppendChain`] keeps after they commit. A lookup whose snapshot was
/// taken before some of them committed still finds its place in the chain; the batcher has at
/// most a few batches in flight, so eight covers any lookup that is not badly delayed (one
/// that is simply takes the locked path).
const CHAIN_HISTORY: usize = 8;

/// A batch this process decided and is writing (or wrote): the head it was decided on, the
/// head it leaves, and what it writes, so the next batch can be decided on top of it before
/// it commits.
struct Link {
    seq: u64,
    base: i64,
    next: i64,
    ids: HashMap<(String, String), (Appended, Option<String>)>,
    versions: HashMap<String, i64>,
    /// `Some(applied)` once its write has ended; dropped (closed) when the link leaves the
    /// chain unsettled, which its followers take as "did not apply".
    settled: watch::Sender<Option<bool>>,
}

impl Link {
    fn committed(&self) -> bool {
        *self.settled.borrow() == Some(true)
    }
}

#[derive(Default)]
struct ChainState {
    stream_id: i64,
    links: VecDeque<Link>,
    seq: u64,
}

/// The batches of one stream this process has decided, in head order: pending ones (being
/// written, not yet known to have committed) and a few committed ones. One per stream and
/// process (the batcher's writer owns it); [`Store::append`] uses a fresh one per call.
#[derive(Default)]
pub struct AppendChain {
    state: Mutex<ChainState>,
}

/// A batch decided on the chain.
pub(super) struct Placed {
    pub(super) decided: Decided,
    /// The head the write is guarded by.
    pub(super) base: i64,
    /// The link, when the batch writes something.
    pub(super) seq: Option<u64>,
    /// The decision relied on links that had not committed when it was made.
    pub(super) on_pending: bool,
    /// How the link this batch was decided on top of ends, when it was still pending.
    pub(super) prev: Option<watch::Receiver<Option<bool>>>,
}

impl AppendChain {
    fn lock(&self) -> std::sync::MutexGuard<'_, ChainState> {
        // The state is a cache of this process's own writes: a panic elsewhere while it was
        // held leaves it consistent enough (a wrong guess only fails a guard).
        self.state.locked()
    }

    /// Lays the links the lookup did not see over it, decides the batch on top, and (when it
    /// writes something) appends its link. Atomic, so two batches never claim the same head.
    pub(super) fn place(
        &self,
        stream_id: i64,
        mut known: Known,
        requests: &[AppendInput<'_>],
    ) -> Placed {
        let mut st = self.lock();
        if st.stream_id != stream_id {
            st.links.clear();
            st.stream_id = stream_id;
        }
        let mut on_pending = false;
        let mut prev = None;
        match st.links.iter().position(|l| l.base == known.head) {
            Some(i) => {
                for l in st.links.range(i..) {
                    on_pending |= !l.committed();
                    known
                        .ids
                        .extend(l.ids.iter().map(|(k, v)| (k.clone(), v.clone())));
                    known
                        .versions
                        .extend(l.versions.iter().map(|(k, v)| (k.clone(), *v)));
                    known.head = l.next;
                }
                prev = st
                    .links
                    .back()
                    .filter(|l| !l.committed())
                    .map(|l| l.settled.subscribe());
            }
            // The lookup saw every link, or something this chain does not know about
            // happened: start the chain again from what the lookup saw.
            None if st.links.back().is_some_and(|l| l.next == known.head) => {}
            None => st.links.clear(),
        }
        let mut decided = decide(&known, requests);
        let mut seq = None;
        if !decided.accepted.is_empty() {
            st.seq += 1;
            seq = Some(st.seq);
            let link = Link {
                seq: st.seq,
                base: known.head,
                next: decided.next,
                // Only the link needs them from here on.
                ids: std::mem::take(&mut decided.ids),
                versions: std::mem::take(&mut decided.versions),
                settled: watch::channel(None).0,
            };
            st.links.push_back(link);
        }
        Placed {
            decided,
            base: known.head,
            seq,
            on_pending,
            prev,
        }
    }

    /// Records how a link's write ended. A link that did not apply takes every later link
    /// with it: they were decided on top of it, are never sent, and are decided again under
    /// the lock.
    pub(super) fn settle(&self, seq: u64, applied: bool) {
        let mut st = self.lock();
        let Some(i) = st.links.iter().position(|l| l.seq == seq) else {
            return;
        };
        st.links[i].settled.send_replace(Some(applied));
        if applied {
            while st.links.len() > CHAIN_HISTORY && st.links.front().is_some_and(Link::committed) {
                st.links.pop_front();
            }
        } else {
            st.links.truncate(i);
        }
    }
}
