//! Which releases the controller forgets (pure): of each service, every ended release but the
//! newest `keep` (`--keep-releases`), with its history. Releases under way are always kept;
//! `keep` 0 keeps everything. Newest means the highest number (`checkout-12`): numbers are
//! handed out in order by the store, whatever the clocks of the controllers that started them.

use std::collections::BTreeMap;

/// A release, as retention sees it.
pub struct Seen<'a> {
    pub id: &'a str,
    pub service: &'a str,
    pub ended: bool,
}

/// The ids of the releases to forget, oldest first; never `just_ended`, which counts as kept
/// (its watchers and webhooks have yet to hear of its end).
pub fn forget<'a>(
    releases: impl IntoIterator<Item = Seen<'a>>,
    keep: usize,
    just_ended: Option<&str>,
) -> Vec<String> {
    if keep == 0 {
        return Vec::new();
    }
    let mut ended: BTreeMap<&str, Vec<(u64, &str)>> = BTreeMap::new();
    for r in releases.into_iter().filter(|r| r.ended) {
        ended
            .entry(r.service)
            .or_default()
            .push((number(r.id), r.id));
    }
    let mut out = Vec::new();
    for mut service in ended.into_values() {
        service.sort_unstable_by(|a, b| b.cmp(a));
        out.extend(
            service
                .into_iter()
                .skip(keep)
                .rev()
                .map(|(_, id)| id.to_string()),
        );
    }
    out.retain(|id| Some(id.as_str()) != just_ended);
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

    fn seen(id: &str, ended: bool) -> Seen<'_> {
        let service = id.rsplit_once('-').map_or(id, |(s, _)| s);
        Seen { id, service, ended }
    }

    #[test]
    fn each_service_keeps_its_newest_ended_releases_and_every_one_under_way() {
        let releases = [
            seen("a-10", true),
            seen("a-2", true),
            seen("a-3", true),
            seen("a-40", false),
            seen("b-1", true),
            seen("b-7", true),
            seen("a-5", true),
            seen("a-1", true),
            seen("my-app-11", true),
        ];
        // By number, not as text: a-10 is newer than a-5.
        let forgotten = forget(releases, 2, None);
        assert_eq!(forgotten, ["a-1", "a-2", "a-3"]);
    }

    #[test]
    fn the_release_that_just_ended_is_kept_though_newer_ones_ended_before_it() {
        // a-1 was superseded by a-2, which ended first; a-1's rollback ends now.
        let releases = || [seen("a-1", true), seen("a-2", true)];
        assert!(forget(releases(), 1, Some("a-1")).is_empty());
        // Once anything else ends, a-1 goes.
        assert_eq!(forget(releases(), 1, Some("a-2")), ["a-1"]);
    }

    #[test]
    fn a_service_with_few_ended_releases_and_keep_0_forget_nothing() {
        let releases = || [seen("a-1", true), seen("a-2", false)];
        assert!(forget(releases(), 1, None).is_empty());
        assert!(forget(releases(), 0, None).is_empty());
        let ids: Vec<String> = (1..=5).map(|n| format!("a-{n}")).collect();
        assert!(forget(ids.iter().map(|id| seen(id, true)), 0, None).is_empty());
    }
}
