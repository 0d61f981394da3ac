//! Work that must not take a core from traffic: checking and building route tables (a
//! 10,000-route table is tens of milliseconds of CPU), dropping the tables they replace, and
//! rendering `/stats` and `/metrics`, which take the counters' lock that an install holds.
//!
//! Each piece runs on a thread of its own in the idle scheduling class (`SCHED_IDLE`). On an
//! idle core that changes nothing; on a core busy with traffic the thread serving traffic
//! takes the core back the moment it wakes (weights 1024 against 3), so a build stretches out
//! instead of stalling requests. A table then takes longer to come into force on a saturated
//! core: a 10,000-route table, 50–100 ms of CPU, took 2.8–4.5 s (median of two runs) under
//! the benchmark's load. At nice 19 it took 1.5–2.3 s, but the thread kept the core for a
//! whole slice once it had it: p99 rose 2.0–2.2× while tables were built back to back, against
//! 1.3× in the idle class (`benches/README.md`). A table of a few routes is unaffected.
//!
//! Even so, a thread serving a steady load never sleeps, and the kernel, to be fair to the
//! idle class, now and then hands such a thread the core anyway and leaves it there until its
//! next tick (4 ms at 250 Hz): a pause in every request in flight. So the work stops at the
//! router's yield points (`fleet_proxy_router::pace`) and offers the core back once a
//! [`TURN`] (0.2 ms) has passed. In `benches/stalls.sh` a thread building 10,001-route tables
//! back to back held the traffic's core five or six times in ten seconds, 4.0 ms each time;
//! giving way, it held it 51–87 times, 0.55 ms at the longest.
//!
//! Threads are few and short-lived: at most [`MAX_WORKERS`] pieces of work run at once (the
//! rest wait their turn without blocking the runtime) and one thread drops every retired
//! table. When none is running the process is back to its runtime's threads, which the
//! kernel rewards (see `reload.rs`).

use std::cell::Cell;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, oneshot};

/// How many pieces of work run at once. A burst of `PUT /routes` or scrapes queues here
/// rather than starting a thread, and holding a parsed table, per request.
pub const MAX_WORKERS: usize = 2;

static WORKERS: Semaphore = Semaphore::const_new(MAX_WORKERS);

/// Runs `work` on a new low-priority thread, once fewer than [`MAX_WORKERS`] others run, and
/// waits for its result without blocking the runtime. `Err` only if the thread could not
/// start or `work` panicked.
pub async fn run<T: Send + 'static>(
    name: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> anyhow::Result<T> {
    let turn = WORKERS.acquire().await?;
    let (tx, rx) = oneshot::channel();
    spawn(name, move || {
        let _ = tx.send(work());
        drop(turn);
    })?;
    Ok(rx.await?)
}

/// How long a background thread goes on before it offers the core to a thread waiting for
/// it: wall time since it last did (or first reached a yield point), so time it spent off the
/// core counts too, and a thread that slept gives way at its first point after. Give or take
/// the stretch between two calls of the hook: eight routes read, built or freed, 128 KiB
/// copied.
pub const TURN: Duration = Duration::from_micros(200);

thread_local! {
    /// When this background thread last gave way, or first reached a yield point.
    static TURN_STARTED: Cell<Option<Instant>> = const { Cell::new(None) };
    #[cfg(test)]
    static YIELDS: Cell<u64> = const { Cell::new(0) };
}

/// At the router's yield points on a background thread: gives the core to any thread waiting
/// for it once a [`TURN`] has passed. When none waits, the yield returns at once.
fn give_way_if_due() {
    let now = Instant::now();
    match TURN_STARTED.get() {
        Some(started) if now - started < TURN => {}
        Some(_) => {
            std::thread::yield_now();
            #[cfg(test)]
            YIELDS.set(YIELDS.get() + 1);
            TURN_STARTED.set(Some(Instant::now()));
        }
        None => TURN_STARTED.set(Some(now)),
    }
}

/// Tables taken out of force and not yet dropped, each with the time past which the thread
/// stops waiting for it (a tunnel may hold a table for hours; its last holder then drops it).
struct Retired {
    values: Vec<(Arc<dyn Send + Sync>, Instant)>,
    /// Whether a thread is dropping them; at most one is.
    reaper: bool,
    /// Reaper threads started since the process began.
    reapers_started: usize,
}

static RETIRED: Mutex<Retired> = Mutex::new(Retired {
    values: Vec::new(),
    reaper: false,
    reapers_started: 0,
});

impl Retired {
    /// Takes out the values no one else holds any more or whose patience ran out, to be
    /// dropped by the caller outside the lock.
    fn take_done(&mut self, now: Instant) -> Vec<Arc<dyn Send + Sync>> {
        let (done, waiting) = std::mem::take(&mut self.values)
            .into_iter()
            .partition(|(value, deadline)| Arc::strong_count(value) == 1 || now >= *deadline);
        self.values = waiting;
        done.into_iter().map(|(value, _)| value).collect()
    }
}

/// Hands a table taken out of force to a background thread that drops it once the requests
/// still on it are done, or after `patience`, so that the thread serving traffic does not
/// free a large table when its last request on it ends. If no thread can start, what is
/// waiting is dropped here.
pub fn retire<T: Send + Sync + 'static>(value: Arc<T>, patience: Duration) {
    let mut retired = crate::lock(&RETIRED);
    retired.values.push((value, Instant::now() + patience));
    if std::mem::replace(&mut retired.reaper, true) {
        return;
    }
    retired.reapers_started += 1;
    drop(retired);
    if let Err(e) = spawn("retire", reap) {
        tracing::warn!(error = %e, "cannot start a thread to drop retired tables");
        let mut retired = crate::lock(&RETIRED);
        retired.reaper = false;
        let values = std::mem::take(&mut retired.values);
        drop(retired);
        drop(values);
    }
}

/// The reaper: drops retired values as they come free, and ends when none is left.
fn reap() {
    let _on_panic = Orphaned;
    let mut pause = Duration::from_millis(1);
    loop {
        let done = crate::lock(&RETIRED).take_done(Instant::now());
        drop(done);
        let mut retired = crate::lock(&RETIRED);
        if retired.values.is_empty() {
            // Decided under the lock: a value retired after this starts a new reaper.
            retired.reaper = false;
            return;
        }
        drop(retired);
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// Should a drop panic and end the reaper, the next retirement starts another rather than
/// leaving every later table queued for good.
struct Orphaned;

impl Drop for Orphaned {
    fn drop(&mut self) {
        if std::thread::panicking() {
            crate::lock(&RETIRED).reaper = false;
        }
    }
}

/// Starts `work` on a thread named `fleet-{name}` in the idle scheduling class.
fn spawn(name: &str, work: impl FnOnce() + Send + 'static) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name(format!("fleet-{name}"))
        .spawn(move || {
            lower_priority();
            fleet_proxy_router::pace::on_this_thread(give_way_if_due);
            work();
        })
        .map(drop)
}

/// Puts the calling thread in the idle scheduling class (`SCHED_IDLE`, sched(7)): it runs
/// on what the threads serving traffic leave, and one of them waking takes the core back at
/// once. Policy and nice value belong to the thread on Linux, so those threads keep theirs.
fn lower_priority() {
    use thread_priority::{NormalThreadSchedulePolicy, ThreadPriority, ThreadSchedulePolicy};
    let idle = ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle);
    let me = thread_priority::thread_native_id();
    let set = thread_priority::set_thread_priority_and_policy(me, ThreadPriority::Min, idle);
    // The crate sets the class, then a nice value of 0, which a process started at a higher
    // one may not take back: that second step alone failing leaves the thread idle-class.
    if let Err(e) = set
        && thread_priority::thread_schedule_policy().ok() != Some(idle)
    {
        tracing::debug!(error = ?e, "cannot put a background thread in the idle class");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn work_runs_on_a_thread_of_the_idle_class() {
        use thread_priority::{NormalThreadSchedulePolicy::Idle, ThreadSchedulePolicy::Normal};
        let before = own_policy();
        let (policy, name) = run("test", || {
            (
                own_policy(),
                std::thread::current().name().map(str::to_owned),
            )
        })
        .await
        .unwrap();
        assert_eq!(policy, Normal(Idle));
        assert_eq!(name.as_deref(), Some("fleet-test"));
        // The caller's thread keeps its class.
        assert_ne!(before, Normal(Idle));
        assert_eq!(own_policy(), before);
    }

    #[tokio::test]
    async fn long_work_gives_the_core_back_each_turn() {
        let (yields, took) = run("test", || {
            // Work with a yield point all along, as a large table has, until it has given
            // way three times (or ten seconds have passed, on a machine that starves it).
            let started = Instant::now();
            while YIELDS.get() < 3 && started.elapsed() < Duration::from_secs(10) {
                fleet_proxy_router::pace::point();
            }
            (YIELDS.get(), started.elapsed())
        })
        .await
        .unwrap();
        assert_eq!(yields, 3);
        // Never before a turn is over.
        assert!(took >= 3 * TURN, "three yields in {took:?}");
    }

    fn own_policy() -> thread_priority::ThreadSchedulePolicy {
        thread_priority::thread_schedule_policy().unwrap()
    }

    #[tokio::test]
    async fn a_panic_in_the_work_is_an_error_not_a_hang() {
        // Unwinds as a panic does, without the panic hook: printing a backtrace is seconds of
        // CPU in a debug build, and an idle-class thread gets almost none of a busy machine.
        let boom = || -> u32 { std::panic::resume_unwind(Box::new("boom")) };
        let outcome = tokio::time::timeout(Duration::from_secs(10), run("test", boom))
            .await
            .expect("a panicking piece of work still answers");
        assert!(outcome.is_err());
        // Its turn is given back: another piece of work runs.
        assert_eq!(run("test", || 7).await.unwrap(), 7);
    }

    #[tokio::test]
    async fn no_more_than_max_workers_run_at_once() {
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let mut pieces = tokio::task::JoinSet::new();
        for _ in 0..4 * MAX_WORKERS {
            let (running, most) = (running.clone(), most.clone());
            pieces.spawn(run("test", move || {
                let now = running.fetch_add(1, SeqCst) + 1;
                most.fetch_max(now, SeqCst);
                // The work itself: long enough that unlimited threads would overlap.
                std::thread::sleep(Duration::from_millis(20));
                running.fetch_sub(1, SeqCst);
            }));
        }
        while let Some(outcome) = pieces.join_next().await {
            outcome.unwrap().unwrap();
        }
        let most = most.load(SeqCst);
        assert!((1..=MAX_WORKERS).contains(&most), "{most} ran at once");
    }

    /// Tells, when dropped, which thread dropped it.
    struct Probe(std::sync::mpsc::Sender<Option<String>>);
    impl Drop for Probe {
        fn drop(&mut self) {
            let _ = self
                .0
                .send(std::thread::current().name().map(str::to_owned));
        }
    }

    /// The retirement tests share the one queue: one at a time.
    static QUEUE: Mutex<()> = Mutex::new(());

    #[test]
    fn a_retired_value_is_dropped_by_the_reaper_once_no_one_else_holds_it() {
        let _queue = crate::lock(&QUEUE);
        let (tx, rx) = std::sync::mpsc::channel();
        let held = Arc::new(Probe(tx));
        retire(held.clone(), Duration::from_secs(60));
        assert!(rx.try_recv().is_err(), "dropped while still held");
        // The last request on the table ends: it is not the one to free it.
        drop(held);
        let by = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(by.as_deref(), Some("fleet-retire"));
    }

    #[test]
    fn past_its_patience_the_reaper_lets_go() {
        let _queue = crate::lock(&QUEUE);
        let held = Arc::new(());
        let started = Instant::now();
        retire(held.clone(), Duration::from_millis(30));
        eventually(|| Arc::strong_count(&held) == 1);
        assert!(started.elapsed() >= Duration::from_millis(30));
    }

    #[test]
    fn one_thread_drops_every_retired_value_and_ends_when_done() {
        let _queue = crate::lock(&QUEUE);
        let started = || crate::lock(&RETIRED).reapers_started;
        let before = started();
        let held: Vec<Arc<u32>> = (0..50).map(Arc::new).collect();
        for value in &held {
            retire(value.clone(), Duration::from_secs(60));
        }
        // None if the last test's reaper was still at work and took these on.
        assert!(
            started() - before <= 1,
            "{} reapers started",
            started() - before
        );
        drop(held);
        // The reaper is done, then gone (a thread just started may not bear its name yet:
        // the flag first).
        eventually(|| !crate::lock(&RETIRED).reaper);
        eventually(|| reapers() == 0);
    }

    /// Threads of this process named `fleet-retire`.
    fn reapers() -> usize {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
            .filter(|name| name.trim() == "fleet-retire")
            .count()
    }

    /// Polls `done` until it holds, for at most ten seconds.
    fn eventually(done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "not within ten seconds");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
