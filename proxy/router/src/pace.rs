//! Yield points in the work a large table takes: reading it, checking and building it, and
//! freeing it, all of which grow with its routes.
//!
//! fleet-proxy does that work on threads of the idle scheduling class that share a core with
//! the thread serving traffic, and gives the core back now and then (`background.rs`). The
//! router only says where it may: a thread that has set a hook with [`on_this_thread`] has
//! it called every few [`point`]s, and decides there whether to yield. On any other thread a
//! point is a thread-local read and nothing more. Pure: no clock, no system call.

use std::cell::Cell;

/// Points between calls of the hook: eight routes read, checked, indexed or freed.
pub(crate) const EVERY: u32 = 8;

/// Bytes copied between points by [`concat`].
const PIECE: usize = 16 << 10;

thread_local! {
    static HOOK: Cell<Option<fn()>> = const { Cell::new(None) };
    static POINTS: Cell<u32> = const { Cell::new(0) };
}

/// From now on `hook` is called on the calling thread at every few [`point`]s.
pub fn on_this_thread(hook: fn()) {
    HOOK.with(|h| h.set(Some(hook)));
    POINTS.with(|p| p.set(0));
}

/// A place where the work may stop for a moment: every few calls, the calling thread's hook,
/// if it has one.
pub fn point() {
    let Some(hook) = HOOK.with(Cell::get) else {
        return;
    };
    let n = POINTS.with(|p| {
        let n = p.get().wrapping_add(1);
        p.set(n);
        n
    });
    if n.is_multiple_of(EVERY) {
        hook();
    }
}

/// Drops `items` one by one, with a [`point`] after each.
pub fn release<T>(items: Vec<T>) {
    for item in items {
        drop(item);
        point();
    }
}

/// `pieces` one after the other in one vector, with a [`point`] after each: unlike a vector
/// grown one element at a time, each of whose doublings copies all of it at once (1.2 ms for
/// the routes of a 10,000-route table).
pub fn join<T>(pieces: Vec<Vec<T>>) -> Vec<T> {
    let mut out = Vec::with_capacity(pieces.iter().map(Vec::len).sum());
    for piece in pieces {
        out.extend(piece);
        point();
    }
    out
}

/// The bytes of `chunks` in one buffer, with a [`point`] every 16 KiB copied.
pub fn concat<B: AsRef<[u8]>>(chunks: &[B]) -> Vec<u8> {
    let mut out = Vec::with_capacity(chunks.iter().map(|c| c.as_ref().len()).sum());
    for piece in chunks.iter().flat_map(|c| c.as_ref().chunks(PIECE)) {
        out.extend_from_slice(piece);
        point();
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use std::rc::Rc;

    use super::*;

    thread_local! {
        static CALLS: Cell<u64> = const { Cell::new(0) };
    }

    /// A hook that counts its calls on this thread; returns the count so far.
    pub(crate) fn counting() -> u64 {
        on_this_thread(|| CALLS.with(|c| c.set(c.get() + 1)));
        calls()
    }

    pub(crate) fn calls() -> u64 {
        CALLS.with(Cell::get)
    }

    #[test]
    fn the_hook_is_called_every_few_points_on_its_thread_only() {
        std::thread::spawn(|| {
            (0..10 * EVERY).for_each(|_| point());
            assert_eq!(calls(), 0, "no hook yet");
            let before = counting();
            (0..10 * EVERY).for_each(|_| point());
            assert_eq!(calls() - before, 10);
        })
        .join()
        .unwrap();
        assert_eq!(calls(), 0, "another thread's hook");
    }

    #[test]
    fn release_join_and_concat_keep_everything_and_stop_along_the_way() {
        let before = counting();
        let counted = Rc::new(());
        release(vec![counted.clone(); 10 * EVERY as usize + 3]);
        assert_eq!(Rc::strong_count(&counted), 1, "every item dropped");
        assert_eq!(calls() - before, 10);
        assert_eq!(join(vec![vec![1, 2], vec![], vec![3]]), [1, 2, 3]);
        let big = vec![7u8; 3 * PIECE + 5];
        let joined = concat(&[&b"ab"[..], &big, &b""[..], &b"c"[..]]);
        assert_eq!(joined.len(), big.len() + 3);
        assert_eq!(&joined[..3], b"ab\x07");
        assert_eq!(joined.last(), Some(&b'c'));
    }
}
