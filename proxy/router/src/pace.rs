//! Yield points in the work a large table takes: reading it, checking and building it, and
//! freeing it, all of which grow with its routes.
//!
//! fleet-proxy does that work on threads of the idle scheduling class that share a core with
//! the thread serving traffic. A thread serving traffic that wakes takes the core back at
//! once; but one kept busy by a steady load never sleeps, and the kernel, to be fair to the
//! idle thread, now and then hands it the core anyway and leaves it there until its next tick
//! (4 ms at 250 Hz): a pause in every request in flight. A thread that has called [`enable`]
//! gives the core back at the next [`point`] once it has worked [`TURN`] since it last did, so
//! such a pause lasts about that long (`benches/README.md`). When no other thread waits for
//! the core a yield returns at once, and on any other thread a point does nothing.

use std::cell::Cell;
use std::time::{Duration, Instant};

/// How long a thread that gives way works between yields, at most (give or take one
/// stretch between points: a few routes, a few KiB copied).
pub const TURN: Duration = Duration::from_micros(200);

/// Points between looks at the clock.
const LOOK_EVERY: u32 = 8;

/// Elements dropped, or KiB copied, between points.
const BATCH: usize = 16;

thread_local! {
    /// When this thread last gave way (or began to), if it gives way at all.
    static SINCE: Cell<Option<Instant>> = const { Cell::new(None) };
    static POINTS: Cell<u32> = const { Cell::new(0) };
    static YIELDS: Cell<u64> = const { Cell::new(0) };
}

/// From now on the calling thread gives way at [`point`]s.
pub fn enable() {
    SINCE.with(|s| s.set(Some(Instant::now())));
}

/// Gives the core to a thread waiting for it if the calling thread gives way and has worked
/// [`TURN`] since it last did. Cheap: a thread-local read, and a look at the clock every
/// few calls.
pub fn point() {
    let Some(since) = SINCE.with(Cell::get) else {
        return;
    };
    let n = POINTS.with(|p| {
        let n = p.get().wrapping_add(1);
        p.set(n);
        n
    });
    if n.is_multiple_of(LOOK_EVERY) && since.elapsed() >= TURN {
        YIELDS.with(|y| y.set(y.get() + 1));
        std::thread::yield_now();
        SINCE.with(|s| s.set(Some(Instant::now())));
    }
}

/// Drops `items` a few at a time, with a [`point`] between.
pub fn release<T>(mut items: Vec<T>) {
    while items.len() > BATCH {
        items.truncate(items.len() - BATCH);
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

/// The bytes of `chunks` in one buffer, with a [`point`] every few KiB copied.
pub fn concat<B: AsRef<[u8]>>(chunks: &[B]) -> Vec<u8> {
    let mut out = Vec::with_capacity(chunks.iter().map(|c| c.as_ref().len()).sum());
    for piece in chunks.iter().flat_map(|c| c.as_ref().chunks(BATCH << 10)) {
        out.extend_from_slice(piece);
        point();
    }
    out
}

/// How many times the calling thread has given way.
pub fn yields() -> u64 {
    YIELDS.with(Cell::get)
}

#[cfg(test)]
mod tests {
    use std::rc::Rc;

    use super::*;

    /// Works (spins) for `d` of wall time, calling `point` all along.
    fn work_for(d: Duration) {
        let started = Instant::now();
        while started.elapsed() < d {
            point();
        }
    }

    #[test]
    fn a_thread_that_gives_way_yields_after_each_turn_of_work_and_another_never_does() {
        std::thread::spawn(|| {
            work_for(5 * TURN);
            assert_eq!(yields(), 0, "not enabled");
            enable();
            work_for(10 * TURN);
            let n = yields();
            // A turn each, or fewer if the test thread was itself kept off the core.
            assert!((1..=10).contains(&n), "{n} yields in ten turns");
        })
        .join()
        .unwrap();
    }

    #[test]
    fn release_join_and_concat_keep_everything() {
        let counted = Rc::new(());
        release(vec![counted.clone(); 10 * BATCH + 3]);
        assert_eq!(Rc::strong_count(&counted), 1, "every item dropped");
        let joined = join(vec![vec![1, 2], vec![], vec![3]]);
        assert_eq!(joined, [1, 2, 3]);
        let big = vec![7u8; 3 * (BATCH << 10) + 5];
        let concatenated = concat(&[&b"ab"[..], &big, &b""[..], &b"c"[..]]);
        assert_eq!(concatenated.len(), big.len() + 3);
        assert_eq!(&concatenated[..3], b"ab\x07");
        assert_eq!(concatenated.last(), Some(&b'c'));
    }
}
