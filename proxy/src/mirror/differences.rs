//! The last mirrored copies answered otherwise than their primaries, for `GET
//! /mirror/differences`: the counters say how many, these say which requests, so that an
//! operator can look at what changed.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use super::compare::Answer;

/// How many differences are kept: the newest, older ones dropped.
pub const KEPT: usize = 32;

/// Paths are kept up to this many bytes, methods (extension methods can be long) up to this.
pub const PATH_MAX: usize = 1024;
pub const METHOD_MAX: usize = 32;

/// One copy answered otherwise than its primary.
#[derive(Debug)]
pub struct Difference {
    pub at: SystemTime,
    pub route: String,
    pub track: String,
    pub method: String,
    /// The request's path, without its query (which may carry credentials).
    pub path: String,
    pub primary: Answer,
    pub copy: Answer,
}

#[derive(Debug, Default)]
pub struct Differences(Mutex<VecDeque<Difference>>);

impl Differences {
    pub fn record(&self, difference: Difference) {
        let mut kept = crate::lock(&self.0);
        let dropped = (kept.len() == KEPT).then(|| kept.pop_front());
        kept.push_back(difference);
        drop(kept);
        // Freed outside the lock.
        drop(dropped);
    }

    /// The differences kept, oldest first.
    pub fn json(&self) -> Value {
        let kept = crate::lock(&self.0);
        let answer = |a: &Answer| {
            let grpc = a
                .grpc
                .as_ref()
                .map(|v| String::from_utf8_lossy(v.as_bytes()));
            json!({ "status": a.status, "grpc_status": grpc })
        };
        let differences: Vec<Value> = kept
            .iter()
            .map(|d| {
                let at = d.at.duration_since(UNIX_EPOCH).unwrap_or_default();
                let bodies = bodies_differ(&d.primary, &d.copy);
                json!({
                    "at_unix_ms": at.as_millis() as u64,
                    "route": d.route,
                    "track": d.track,
                    "method": d.method,
                    "path": d.path,
                    "primary": answer(&d.primary),
                    "copy": answer(&d.copy),
                    "bodies_differ": bodies,
                })
            })
            .collect();
        json!({ "kept": KEPT, "differences": differences })
    }
}

/// Whether the bodies differed: `None` unless both were digested (`compare: body`).
pub fn bodies_differ(primary: &Answer, copy: &Answer) -> Option<bool> {
    match (primary.body, copy.body) {
        (Some(p), Some(c)) => Some(p != c),
        _ => None,
    }
}

/// `text` cut to at most `max` bytes, on a character boundary.
pub fn cut(text: &str, max: usize) -> String {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn difference(path: &str) -> Difference {
        let answer = |status| Answer {
            status,
            grpc: None,
            body: None,
        };
        Difference {
            at: UNIX_EPOCH,
            route: "web".into(),
            track: "shadow".into(),
            method: "GET".into(),
            path: path.into(),
            primary: answer(200),
            copy: answer(404),
        }
    }

    #[test]
    fn only_the_newest_are_kept_oldest_first() {
        let kept = Differences::default();
        for i in 0..KEPT + 3 {
            kept.record(difference(&format!("/{i}")));
        }
        let json = kept.json();
        let paths: Vec<&str> = json["differences"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["path"].as_str().unwrap())
            .collect();
        assert_eq!(paths.len(), KEPT);
        assert_eq!((paths[0], paths[KEPT - 1]), ("/3", "/34"));
        assert_eq!(json["differences"][0]["bodies_differ"], Value::Null);
    }

    #[test]
    fn long_paths_are_cut_on_a_character_boundary() {
        let path = format!("/{}é", "a".repeat(PATH_MAX - 2));
        let kept = cut(&path, PATH_MAX);
        assert_eq!(kept.len(), PATH_MAX - 1);
        assert_eq!(cut("/short", PATH_MAX), "/short");
    }
}
