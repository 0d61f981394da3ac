//! Whether a region has applied a release's step, from its agents' reports. Pure.

use fleet_proto::v1 as pb;

/// How far the region has applied release `id`: the lowest step any of its `clusters` has
/// applied, and whether all of them are ready; `None` until every cluster's agent (by its
/// agent identity; each one connected, if several) reports on `id`. An agent of a cluster the
/// manifest does not name (one left over, say) has no say. `reports` are the region's
/// connected agents: their cluster, and their last report if any. Pure.
pub(crate) fn region_applied(
    id: &str,
    clusters: &[fleet::model::Cluster],
    reports: &[(String, Option<pb::AgentStatus>)],
) -> Option<RegionApplied> {
    let mut lowest: Option<u64> = None;
    let mut ready = true;
    let mut why = Vec::new();
    for cluster in clusters {
        let mut heard = false;
        for (_, report) in reports.iter().filter(|(c, _)| *c == cluster.agent) {
            let report = report.as_ref().filter(|r| r.release_id == id)?;
            lowest = Some(lowest.map_or(report.applied_seq, |l| l.min(report.applied_seq)));
            ready &= report.ready;
            if !report.ready && !report.detail.is_empty() {
                why.push(format!("{}: {}", cluster.name, report.detail));
            }
            heard = true;
        }
        if !heard {
            return None;
        }
    }
    let detail = why.join("; ");
    lowest.map(|seq| RegionApplied { seq, ready, detail })
}

/// What a region's agents together have applied: the lowest sequence number any of them
/// has, whether every one is ready, and why those that are not say they are not.
#[derive(Debug, PartialEq)]
pub(crate) struct RegionApplied {
    pub seq: u64,
    pub ready: bool,
    pub detail: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq_ready(applied: Option<RegionApplied>) -> Option<(u64, bool)> {
        applied.map(|a| (a.seq, a.ready))
    }

    fn cluster(agent: &str) -> fleet::model::Cluster {
        fleet::model::Cluster {
            name: agent.into(),
            agent: agent.into(),
        }
    }

    fn report(
        cluster: &str,
        release: &str,
        seq: u64,
        ready: bool,
    ) -> (String, Option<pb::AgentStatus>) {
        let status = pb::AgentStatus {
            release_id: release.into(),
            applied_seq: seq,
            ready,
            ..Default::default()
        };
        (cluster.into(), Some(status))
    }

    #[test]
    fn a_region_has_applied_a_step_once_every_cluster_of_the_manifest_has() {
        let clusters = [cluster("usw1-a"), cluster("usw1-b")];
        let both = [
            report("usw1-a", "r1", 4, true),
            report("usw1-b", "r1", 3, true),
        ];
        assert_eq!(
            seq_ready(region_applied("r1", &clusters, &both)),
            Some((3, true)),
            "the lower"
        );
        let one = [report("usw1-a", "r1", 4, true)];
        assert_eq!(
            seq_ready(region_applied("r1", &clusters, &one)),
            None,
            "usw1-b unheard"
        );
        let silent = [report("usw1-a", "r1", 4, true), ("usw1-b".into(), None)];
        assert_eq!(
            seq_ready(region_applied("r1", &clusters, &silent)),
            None,
            "connected, no report yet"
        );
        let behind = [
            report("usw1-a", "r1", 4, true),
            report("usw1-b", "r0", 9, true),
        ];
        assert_eq!(
            seq_ready(region_applied("r1", &clusters, &behind)),
            None,
            "on another release"
        );
        let unready = [
            report("usw1-a", "r1", 4, true),
            report("usw1-b", "r1", 4, false),
        ];
        assert_eq!(
            seq_ready(region_applied("r1", &clusters, &unready)),
            Some((4, false))
        );
    }

    #[test]
    fn an_agent_of_a_cluster_the_manifest_does_not_name_has_no_say() {
        let clusters = [cluster("usw1-a")];
        let stray = [
            report("usw1-a", "r1", 4, true),
            report("usw1-old", "r0", 1, false),
        ];
        assert_eq!(
            seq_ready(region_applied("r1", &clusters, &stray)),
            Some((4, true))
        );
    }

    #[test]
    fn two_agents_of_one_cluster_must_both_have_applied() {
        let clusters = [cluster("usw1-a")];
        let two = [
            report("usw1-a", "r1", 4, true),
            report("usw1-a", "r1", 3, true),
        ];
        assert_eq!(
            seq_ready(region_applied("r1", &clusters, &two)),
            Some((3, true))
        );
        let old = [
            report("usw1-a", "r1", 4, true),
            report("usw1-a", "r0", 9, true),
        ];
        assert_eq!(seq_ready(region_applied("r1", &clusters, &old)), None);
    }

    #[test]
    fn the_clusters_that_are_not_ready_say_why_by_name() {
        let clusters = [cluster("usw1-a"), cluster("usw1-b"), cluster("usw1-c")];
        let mut b = report("usw1-b", "r1", 4, false);
        let mut c = report("usw1-c", "r1", 4, true);
        for (report, detail) in [(&mut b, "canary v2: 0/1 ready"), (&mut c, "stale words")] {
            if let Some(status) = report.1.as_mut() {
                status.detail = detail.into();
            }
        }
        let applied = region_applied("r1", &clusters, &[report("usw1-a", "r1", 4, false), b, c]);
        let detail = applied.map(|a| a.detail);
        assert_eq!(
            detail.as_deref(),
            Some("usw1-b: canary v2: 0/1 ready"),
            "only a cluster that is not ready and says why is named"
        );
    }
}
