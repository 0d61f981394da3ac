//! Work that must not take a core from traffic: checking and building route tables (a
//! 10,000-route table is tens of milliseconds of CPU), dropping the tables they replace, and
//! rendering `/stats` and `/metrics`, which take the counters' lock that an install holds.
//!
//! Each piece runs on a thread of its own at the lowest CPU priority (nice 19). On an idle
//! core that changes nothing; on a core busy with traffic the scheduler gives the thread
//! serving traffic nearly all of it (weights 1024 against 15), so a build stretches out
//! instead of stalling requests. A table then takes longer to come into force on a saturated
//! core: about a second for 10,000 routes at the benchmark's load (4.6 s the worst seen), where
//! it took 150 ms; the scheduler never starves it. A table of a few routes is unaffected.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

/// The nice value of background threads: the lowest priority short of `SCHED_IDLE`.
const NICE: i32 = 19;

/// Runs `work` on a new low-priority thread and waits for its result without blocking the
/// runtime. `Err` only if the thread could not start or `work` panicked.
pub async fn run<T: Send + 'static>(
    name: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> anyhow::Result<T> {
    let (tx, rx) = oneshot::channel();
    spawn(name, move || {
        let _ = tx.send(work());
    })?;
    Ok(rx.await?)
}

/// Waits, on the calling (background) thread, until `value` is its last holder and drops it
/// there, so that the thread serving traffic does not free a large table when its last
/// request on it ends. Gives up after `patience` (a tunnel may hold a table for hours); the
/// last holder then drops it.
pub fn drop_when_unshared<T>(value: Arc<T>, patience: Duration) {
    let deadline = Instant::now() + patience;
    let mut pause = Duration::from_millis(1);
    while Arc::strong_count(&value) > 1 && Instant::now() < deadline {
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
    drop(value);
}

/// Hands a table taken out of force to a background thread that drops it once the requests
/// still on it are done ([`drop_when_unshared`]). If no thread can start, it is dropped here.
pub fn retire<T: Send + Sync + 'static>(value: Arc<T>, patience: Duration) {
    if let Err(e) = spawn("retire", move || drop_when_unshared(value, patience)) {
        tracing::debug!(error = %e, "cannot start a thread to drop a retired table");
    }
}

/// Starts `work` on a thread named `fleet-{name}` at the lowest priority.
fn spawn(name: &str, work: impl FnOnce() + Send + 'static) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name(format!("fleet-{name}"))
        .spawn(move || {
            lower_priority();
            work();
        })
        .map(drop)
}

/// Lowers the calling thread's priority. On Linux the nice value belongs to the thread
/// (`setpriority(2)`, NOTES), so the threads serving traffic keep theirs.
fn lower_priority() {
    let me = rustix::thread::gettid();
    if let Err(e) = rustix::process::setpriority_process(Some(me), NICE) {
        tracing::debug!(error = %e, "cannot lower the priority of a background thread");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn work_runs_on_a_thread_of_the_lowest_priority() {
        let before = own_nice();
        let (nice, name) = run("test", || {
            (own_nice(), std::thread::current().name().map(str::to_owned))
        })
        .await
        .unwrap();
        assert_eq!(nice, NICE);
        assert_eq!(name.as_deref(), Some("fleet-test"));
        // The caller's thread keeps its priority.
        assert_eq!(own_nice(), before);
    }

    fn own_nice() -> i32 {
        rustix::process::getpriority_process(Some(rustix::thread::gettid())).unwrap()
    }

    #[tokio::test]
    async fn a_panic_in_the_work_is_an_error_not_a_hang() {
        let outcome = run("test", || -> u32 { panic!("boom") }).await;
        assert!(outcome.is_err());
    }

    #[test]
    fn the_value_is_dropped_here_once_no_one_else_holds_it() {
        struct Probe(std::sync::mpsc::Sender<std::thread::ThreadId>);
        impl Drop for Probe {
            fn drop(&mut self) {
                let _ = self.0.send(std::thread::current().id());
            }
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let value = Arc::new(Probe(tx));
        let held = value.clone();
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            drop(held);
        });
        drop_when_unshared(value, Duration::from_secs(10));
        releaser.join().unwrap();
        assert_eq!(rx.recv().unwrap(), std::thread::current().id());
    }

    #[test]
    fn past_its_patience_the_last_holder_drops_it() {
        let value = Arc::new(());
        let held = value.clone();
        let started = Instant::now();
        drop_when_unshared(value, Duration::from_millis(30));
        assert!(started.elapsed() >= Duration::from_millis(30));
        assert_eq!(Arc::strong_count(&held), 1);
    }
}
