//! The `fleet-proxy` binary: `--check`, SIGHUP reload and SIGTERM drain, as an operator
//! would use them.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::{Backend, Mode, get};

const BIN: &str = env!("CARGO_BIN_EXE_fleet-proxy");

fn temp_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "fleet-proxy-{tag}-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn check_exits_0_for_a_valid_file_and_1_with_every_diagnostic_for_a_broken_one() {
    let dir = temp_dir("check");
    let good = dir.join("good.yaml");
    std::fs::write(&good, "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\ntracks:\n  stable: { backends: [\"127.0.0.1:1\"] }\nroutes:\n  - { split: { stable: 10000 } }\n").unwrap();
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&good)
        .arg("--check")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bad = dir.join("bad.yaml");
    std::fs::write(&bad, "listen: 127.0.0.1:0\nadmin: nowhere\ntracks:\n  stable: { backends: [\"127.0.0.1:1\"] }\nroutes:\n  - { split: { stable: 100 }, mirorr: {} }\n").unwrap();
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&bad)
        .arg("--check")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let file = bad.display().to_string();
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines,
        [
            format!(
                "{file}:2:8: error: admin: \"nowhere\" is not an IP address and port; write it as `127.0.0.1:8080` or `[::]:8080`"
            ),
            format!(
                "{file}:6:14: error: routes[0].split: shares sum to 100, not 10000; shares are basis points: 10000 is 100%, 500 is 5%"
            ),
            format!(
                "{file}:6:31: error: routes[0].mirorr: unknown field \"mirorr\"; did you mean \"mirror\"?"
            ),
        ]
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A running `fleet-proxy`, with the lines it has logged since "serving" and its first
/// traffic address; killed if the test ends before it exits.
struct Running(std::process::Child, Arc<Mutex<Vec<String>>>, String);

impl Running {
    /// How many lines logged so far contain `text`.
    fn logged(&self, text: &str) -> usize {
        self.1
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(text))
            .count()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Runs the binary and reads the admin address from its "serving" log line.
fn spawn(config: &std::path::Path) -> (Running, String) {
    spawn_with(config, &[])
}

fn spawn_with(config: &std::path::Path, args: &[&str]) -> (Running, String) {
    let (child, lines, traffic, admin) = start(config, args);
    // Keep draining stderr so the child never blocks on a full pipe.
    let logs = Arc::new(Mutex::new(Vec::new()));
    let kept = logs.clone();
    std::thread::spawn(move || {
        lines
            .map_while(Result::ok)
            .for_each(|l| kept.lock().unwrap().push(l))
    });
    (Running(child, logs, traffic), admin)
}

/// Log lines still to come from a started proxy.
type Lines = std::io::Lines<BufReader<std::process::ChildStderr>>;

/// Starts the binary: it, its log lines after "serving", and its traffic and admin addresses.
fn start(config: &std::path::Path, args: &[&str]) -> (std::process::Child, Lines, String, String) {
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(config)
        .args(args)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let value = |line: &str, key: &str| {
        let rest = line.split(key).nth(1)?;
        Some(
            rest.split([' ', ',', '"'])
                .find(|v| !v.is_empty())?
                .to_string(),
        )
    };
    let (traffic, admin) = loop {
        let line = lines
            .next()
            .expect("the proxy logs before it exits")
            .unwrap();
        if let Some(admin) = value(&line, "admin=") {
            break (
                value(&line, "traffic=").expect("traffic= before admin="),
                admin,
            );
        }
    };
    (child, lines, traffic, admin)
}

#[tokio::test]
async fn a_log_that_cannot_be_written_loses_lines_not_requests() {
    let dir = temp_dir("lost-log");
    let file = dir.join("proxy.yaml");
    // Nothing listens on port 1: every request fails, and the fifth failure in a row ejects
    // the backend, which is logged.
    let config = "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\ntracks:\n  stable: { backends: [\"127.0.0.1:1\"] }\nroutes:\n  - { split: { stable: 10000 } }\n";
    std::fs::write(&file, config).unwrap();
    let (child, lines, traffic, admin) = start(&file, &[]);
    let running = Running(child, Arc::default(), traffic);
    // Whatever collected its log is gone: each line it writes now fails (EPIPE), as on a
    // full disk.
    drop(lines);
    for n in 0..8 {
        let answer = get(&format!("http://{}/", running.2)).await;
        let (status, _, _) = answer.unwrap_or_else(|| panic!("request {n} got no answer"));
        assert!(status.is_server_error(), "request {n}: {status}");
    }
    let (status, _, _) = get(&format!("http://{admin}/healthz")).await.unwrap();
    assert_eq!(status.as_u16(), 200);
    drop(running);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A config file whose watcher looks once an hour, so that only SIGHUP reloads it in a test's
/// time, with one `stable` track at `stable` and one route, `{ route }`.
fn reloaded_on_sighup(stable: std::net::SocketAddr, route: &str) -> String {
    format!(
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nwatch_interval: 1h\ntracks:\n  stable: {{ backends: [\"{stable}\"] }}\nroutes:\n  - {{ {route} }}\n"
    )
}

fn signal(child: &std::process::Child, sig: &str) {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn sighup_reloads_the_file_and_sigterm_drains_and_exits_0() {
    let stable = Backend::start("stable", Mode::Normal).await;
    let dir = temp_dir("signals");
    let file = dir.join("proxy.yaml");
    // The watcher polls once an hour: only SIGHUP can make this reload happen in time.
    let config = |split: &str| reloaded_on_sighup(stable.addr, &format!("split: {split}"));
    std::fs::write(&file, config("{ stable: 10000 }")).unwrap();
    let (mut child, admin) = spawn(&file);
    let version = || async {
        let (_, _, body) = get(&format!("http://{admin}/routes")).await?;
        serde_json::from_str::<serde_json::Value>(&body).ok()?["version"].as_u64()
    };
    crate::support::eventually(Duration::from_secs(10), || async {
        version().await == Some(1)
    })
    .await;
    std::fs::write(&file, config("{ stable: 10000 }, name: renamed")).unwrap();
    signal(&child.0, "HUP");
    crate::support::eventually(Duration::from_secs(10), || async {
        version().await == Some(2)
    })
    .await;
    signal(&child.0, "TERM");
    assert_eq!(
        exit_code(&mut child.0, Duration::from_secs(10)).await,
        Some(0)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The exit code of `child`, polled for until `within` has passed.
async fn exit_code(child: &mut std::process::Child, within: Duration) -> Option<i32> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        assert!(
            Instant::now() < deadline,
            "still running {within:?} after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A proxy (in `temp_dir(tag)`) with `drain_timeout`, serving a request its backend holds for
/// a minute (one try, with a minute to answer: only the drain can end it early).
async fn serving_a_stuck_request(
    tag: &str,
    drain_timeout: &str,
) -> (
    Running,
    tokio::task::JoinHandle<Option<(http::StatusCode, http::HeaderMap, String)>>,
    std::path::PathBuf,
    Backend,
) {
    let stuck = Backend::start("stable", Mode::Slow(Duration::from_secs(60))).await;
    let dir = temp_dir(tag);
    let file = dir.join("proxy.yaml");
    let yaml = reloaded_on_sighup(stuck.addr, "split: { stable: 10000 }");
    let limits = format!(
        "drain_timeout: {drain_timeout}\nupstream: {{ retries: 0, request_timeout: 60s }}\n"
    );
    std::fs::write(&file, format!("{yaml}{limits}")).unwrap();
    let (child, _) = spawn(&file);
    let addr = child.2.clone();
    let in_flight = tokio::spawn(async move { get(&format!("http://{addr}/")).await });
    crate::support::eventually(Duration::from_secs(10), || async { stuck.hits() == 1 }).await;
    (child, in_flight, dir, stuck)
}

/// A request that outlives `drain_timeout` does not hold the process: at the deadline it is
/// cut, and the proxy still exits 0.
#[tokio::test]
async fn sigterm_exits_0_at_drain_timeout_when_a_request_outlives_it() {
    let (mut child, in_flight, dir, _stuck) =
        serving_a_stuck_request("drain-deadline", "500ms").await;
    let asked = Instant::now();
    signal(&child.0, "TERM");
    assert_eq!(
        exit_code(&mut child.0, Duration::from_secs(10)).await,
        Some(0)
    );
    let waited = asked.elapsed();
    assert!(
        waited >= Duration::from_millis(450),
        "exited after {waited:?}, before the request's drain deadline"
    );
    // The last lines may still be on their way through the thread that reads them.
    crate::support::eventually(Duration::from_secs(5), || async {
        child.logged("drain deadline passed") > 0
    })
    .await;
    let cut = in_flight.await.unwrap();
    assert!(
        cut.as_ref()
            .is_none_or(|(status, _, _)| !status.is_success()),
        "the request outliving the deadline was not answered as if it had finished: {cut:?}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A SIGHUP (or a `touch`) with the file's text unchanged puts nothing in force: the table an
/// agent put through `PUT /routes` since stays. Only a changed text replaces it.
#[tokio::test]
async fn a_reload_of_unchanged_text_leaves_a_put_table_in_force() {
    let stable = Backend::start("stable", Mode::Normal).await;
    let dir = temp_dir("unchanged");
    let file = dir.join("proxy.yaml");
    let config = |name: &str| {
        reloaded_on_sighup(
            stable.addr,
            &format!("name: {name}, split: {{ stable: 10000 }}"),
        )
    };
    std::fs::write(&file, config("from-file")).unwrap();
    let (child, admin) = spawn(&file);
    let routes = || async {
        let (_, _, body) = get(&format!("http://{admin}/routes")).await?;
        let table = serde_json::from_str::<serde_json::Value>(&body).ok()?;
        Some((
            table["version"].as_u64()?,
            table["routes"][0]["name"].as_str()?.to_string(),
        ))
    };
    crate::support::eventually(Duration::from_secs(10), || async {
        routes().await.is_some()
    })
    .await;
    let pushed = serde_json::json!({
        "tracks": { "stable": { "backends": [stable.addr.to_string()] } },
        "routes": [{ "name": "pushed", "split": { "stable": 10000 } }],
    });
    let (status, _) =
        crate::support::put(&format!("http://{admin}/routes"), &pushed.to_string()).await;
    assert_eq!(status, http::StatusCode::OK);
    let in_force = Some((2, "pushed".to_string()));
    assert_eq!(routes().await, in_force);
    // SIGHUP with nothing changed; then the same text written again (a new modification
    // time, as `touch` or a config tool gives), and SIGHUP.
    for looked in 1..=2 {
        if looked == 2 {
            std::fs::write(&file, config("from-file")).unwrap();
        }
        signal(&child.0, "HUP");
        crate::support::eventually(Duration::from_secs(10), || async {
            child.logged("config and certificates unchanged") == looked
        })
        .await;
        assert_eq!(routes().await, in_force, "after look {looked}");
    }
    // A changed text is put in force; what it changes of the settings read at start only
    // is named, not silently passed over.
    let edited = config("edited").replace(
        "watch_interval: 1h",
        "watch_interval: 1h\nupstream: { retries: 1 }",
    );
    std::fs::write(&file, edited).unwrap();
    signal(&child.0, "HUP");
    crate::support::eventually(Duration::from_secs(10), || async {
        routes().await == Some((3, "edited".to_string()))
    })
    .await;
    let warned = "settings read at start only changed; they take effect on restart";
    // Logged before the table went in, but read from the pipe on a thread of its own.
    crate::support::eventually(Duration::from_secs(10), || async {
        child.logged(warned) == 1
    })
    .await;
    assert_eq!(child.logged("changed=upstream"), 1);
    drop(child);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// With one worker the proxy is one thread (the kernel then takes no reference on a socket
/// per call): the file watcher must not keep a thread alive, and the threads that build a
/// reloaded table and free the old one end when done.
#[tokio::test]
async fn one_worker_is_one_thread_while_the_file_is_watched() {
    let stable = Backend::start("stable", Mode::Normal).await;
    let dir = temp_dir("threads");
    let file = dir.join("proxy.yaml");
    let config = |name: &str| {
        format!(
            "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nwatch_interval: 20ms\ntracks:\n  stable: {{ backends: [\"{}\"] }}\nroutes:\n  - {{ name: {name}, split: {{ stable: 10000 }} }}\n",
            stable.addr
        )
    };
    std::fs::write(&file, config("first")).unwrap();
    let (child, admin) = spawn_with(&file, &["--worker-threads", "1"]);
    let threads = || {
        std::fs::read_dir(format!("/proc/{}/task", child.0.id()))
            .unwrap()
            .count()
    };
    crate::support::eventually(Duration::from_secs(10), || async {
        get(&format!("http://{admin}/readyz")).await.is_some()
    })
    .await;
    // Twenty-five looks at the file.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(threads(), 1);
    // A reload builds the table on a thread of its own and frees the old one on another.
    std::fs::write(&file, config("second")).unwrap();
    crate::support::eventually(Duration::from_secs(10), || async {
        let Some((_, _, body)) = get(&format!("http://{admin}/routes")).await else {
            return false;
        };
        body.contains("\"second\"")
    })
    .await;
    crate::support::eventually(Duration::from_secs(10), || async { threads() == 1 }).await;
    drop(child);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A second SIGTERM (or Ctrl-C) during a drain ends it at once, with exit code 1: an
/// operator need not wait out `drain_timeout` for a request that would outlive it.
#[tokio::test]
async fn a_second_sigterm_ends_the_drain_at_once() {
    let (mut child, in_flight, dir, _stuck) = serving_a_stuck_request("second-signal", "60s").await;
    signal(&child.0, "TERM");
    crate::support::eventually(Duration::from_secs(5), || async {
        child.logged("draining") > 0
    })
    .await;
    signal(&child.0, "TERM");
    assert_eq!(
        exit_code(&mut child.0, Duration::from_secs(10)).await,
        Some(1)
    );
    drop(in_flight);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A proxy an agent programs: not ready on its file's table, ready once a table is put.
#[tokio::test]
async fn with_await_put_the_proxy_is_ready_only_once_a_table_is_put() {
    let stable = Backend::start("stable", Mode::Normal).await;
    let dir = temp_dir("await-put");
    let file = dir.join("proxy.yaml");
    let table = |addr: &str| {
        format!(
            "tracks:\n  stable: {{ backends: [\"{addr}\"] }}\nroutes:\n  - {{ split: {{ stable: 10000 }} }}\n"
        )
    };
    let head = "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nwatch_interval: 20ms\nawait_put: true\n";
    std::fs::write(&file, format!("{head}{}", table("127.0.0.1:1"))).unwrap();
    let (child, admin) = spawn(&file);
    let ready = format!("http://{admin}/readyz");
    crate::support::eventually(Duration::from_secs(10), || async {
        get(&ready).await.is_some()
    })
    .await;
    let (status, _, body) = get(&ready).await.unwrap();
    assert_eq!(
        (status.as_u16(), body.as_str()),
        (503, "awaiting a table (PUT /routes)\n")
    );
    let routes = format!("http://{admin}/routes");
    // A table refused is no table put.
    let (status, _) = crate::support::put(&routes, "tracks: {}\nroutes: []\n").await;
    assert_eq!(status.as_u16(), 400);
    assert_eq!(get(&ready).await.unwrap().0.as_u16(), 503);
    // Before any table is put, the file's is put in force when the file changes.
    std::fs::write(&file, format!("{head}{}", table("127.0.0.1:3"))).unwrap();
    crate::support::eventually(Duration::from_secs(10), || async {
        get(&routes)
            .await
            .is_some_and(|(_, _, body)| body.contains("127.0.0.1:3"))
    })
    .await;
    assert_eq!(get(&ready).await.unwrap().0.as_u16(), 503);
    let (status, body) = crate::support::put(&routes, &table(&stable.addr.to_string())).await;
    assert_eq!(status.as_u16(), 200, "{body}");
    let (status, _, body) = get(&ready).await.unwrap();
    assert_eq!((status.as_u16(), body.as_str()), (200, "ready\n"));

    // The file edited (its table another placeholder): read, and the put table stays.
    std::fs::write(&file, format!("{head}{}", table("127.0.0.1:2"))).unwrap();
    crate::support::eventually(Duration::from_secs(10), || async {
        child.logged("the table put through PUT /routes stays in force") == 1
    })
    .await;
    let (_, _, body) = get(&routes).await.unwrap();
    assert!(body.contains(&stable.addr.to_string()), "{body}");
    assert_eq!(get(&ready).await.unwrap().0.as_u16(), 200);
    drop(child);
    std::fs::remove_dir_all(&dir).unwrap();
}
