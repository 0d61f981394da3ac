//! Which releases the controller forgets (pure): of each service, every ended release but the
//! newest `keep` (`--keep-releases`), with its history. Releases under way are always kept;
//! `keep` 0 keeps everything.

use std::collections::BTreeMap;

/// A release, as retention sees it.
pub struct Seen<'a> {
    pub id: &'a str,
    pub service: &'a str,
    pub started_at_ms: i64,
    pub ended: bool,
}

/// The ids of the releases to forget, oldest first.
pub fn forget<'a>(releases: impl IntoIterator<Item = Seen<'a>>, keep: usize) -> Vec<String> {
    if keep == 0 {
        return Vec::new();
    }
    let mut ended: BTreeMap<&str, Vec<(i64, &str)>> = BTreeMap::new();
    for r in releases.into_iter().filter(|r| r.ended) {
        ended
            .entry(r.service)
            .or_default()
            .push((r.started_at_ms, r.id));
    }
    let mut out = Vec::new();
    for mut service in ended.into_values() {
        // Newest first; of two started in the same millisecond, the later number.
        service.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| number(b.1).cmp(&number(a.1))));
        out.extend(
            service
                .into_iter()
                .skip(keep)
                .rev()
                .map(|(_, id)| id.to_string()),
        );
    }
    out
}

/// A release id's number (`checkout-12`: 12).
fn number(id: &str) -> u64 {
    id.rsplit('-')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(id: &str, started_at_ms: i64, ended: bool) -> Seen<'_> {
        let service = id.rsplit_once('-').map_or(id, |(s, _)| s);
        Seen {
            id,
            service,
            started_at_ms,
            ended,
        }
    }

    #[test]
    fn each_service_keeps_its_newest_ended_releases_and_every_one_under_way() {
        let releases = [
            seen("a-1", 10, true),
            seen("a-2", 20, true),
            seen("a-3", 30, true),
            seen("a-4", 40, false),
            seen("b-1", 5, true),
            seen("b-2", 6, true),
            // Started in the same millisecond: the number decides.
            seen("a-5", 30, true),
            seen("a-10", 30, true),
        ];
        let forgotten = forget(releases, 2);
        assert_eq!(forgotten, ["a-1", "a-2", "a-3"]);
    }

    #[test]
    fn a_service_with_few_ended_releases_and_keep_0_forget_nothing() {
        let releases = || [seen("a-1", 10, true), seen("a-2", 20, false)];
        assert!(forget(releases(), 1).is_empty());
        assert!(forget(releases(), 0).is_empty());
        let many = (1..=5).map(|n| n.to_string()).collect::<Vec<_>>();
        let ids: Vec<String> = many.iter().map(|n| format!("a-{n}")).collect();
        let all = ids.iter().map(|id| seen(id, 1, true));
        assert!(forget(all, 0).is_empty());
    }
}
