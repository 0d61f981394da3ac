//! Which service has each region. A region's desired state, its agents and its proxies' table
//! are one service's (an agent says only its region and cluster), so a controller steers each
//! region for one service: a fleet may not take a region another service's fleet has, nor any
//! service start a release in a region another service's release is steering. Pure.

use std::collections::BTreeMap;

use fleet_proto::v1 as pb;

use crate::runtime::Inner;

/// Who else has a region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Holder {
    /// Another service's fleet names it.
    Fleet { service: String },
    /// Another service's release under way steers it.
    Release { service: String, id: String },
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Holder::Fleet { service } => write!(f, "service {service}'s"),
            Holder::Release { service, id } => {
                write!(f, "steered by service {service}'s release {id}, under way")
            }
        }
    }
}

/// The regions services other than `service` have, each with who has it (a release under way
/// before a fleet).
pub fn held_by_others(inner: &Inner, service: &str) -> BTreeMap<String, Holder> {
    let mut held = BTreeMap::new();
    for (other, fleet) in inner.fleets.iter().filter(|(s, _)| *s != service) {
        for region in &fleet.manifest.regions {
            let holder = Holder::Fleet {
                service: other.clone(),
            };
            held.insert(region.name.clone(), holder);
        }
    }
    let running = (inner.releases.iter())
        .filter(|(_, run)| run.service != service && !run.engine.state().phase.is_terminal());
    for (id, run) in running {
        for region in run.engine.state().regions.keys() {
            let holder = Holder::Release {
                service: run.service.clone(),
                id: id.clone(),
            };
            held.insert(region.clone(), holder);
        }
    }
    held
}

/// Why `manifest` may not be applied, if it may not: its first region that another service's
/// release under way steers, or that another service's fleet has and its own fleet (`had`, the
/// regions of the one applied now) did not have already (a store from before regions were
/// checked keeps what it had).
pub fn refuse_fleet(
    held: &BTreeMap<String, Holder>,
    had: &[String],
    manifest: &fleet::Manifest,
) -> Option<String> {
    let service = &manifest.service.name;
    let (i, region, holder) = (manifest.regions.iter().enumerate()).find_map(|(i, r)| {
        let holder = held.get(&r.name)?;
        let kept = matches!(holder, Holder::Fleet { .. }) && had.contains(&r.name);
        (!kept).then_some((i, &r.name, holder))
    })?;
    Some(format!(
        "regions[{i}].name: region \"{region}\" is {holder}; nothing changed. A region's agents \
         run one service, so a controller steers each region for one: name this fleet's regions \
         apart (\"{service}-{region}\", say, in its waves too, with agents started with that \
         --region and, under mutual TLS, certificates for it), or run a controller of its own \
         for {service} (its own --data, or --etcd-prefix)"
    ))
}

/// Warnings for `manifest` (its source `src`), applied while `releases` of its service are
/// under way (their ids, and the manifests they started with): one for each cluster such a
/// release steers that `manifest` names no longer. A release goes on with the clusters it
/// started with. Pure.
pub fn clusters_gone_under(
    releases: &[(&str, &fleet::Manifest)],
    manifest: &fleet::Manifest,
    src: &str,
) -> Vec<pb::Diagnostic> {
    let mut out = Vec::new();
    for (id, started) in releases {
        for region in &started.regions {
            let now = (manifest.regions.iter().enumerate()).find(|(_, r)| r.name == region.name);
            let named =
                |agent: &str| now.is_some_and(|(_, r)| r.clusters.iter().any(|c| c.agent == agent));
            for cluster in region.clusters.iter().filter(|c| !named(&c.agent)) {
                let path = match now {
                    Some((i, _)) => format!("regions[{i}].clusters"),
                    None => "regions".to_string(),
                };
                let (line, column) = fleet::position(src, &path);
                out.push(pb::Diagnostic {
                    severity: "warning".into(),
                    line: u32::try_from(line).unwrap_or(u32::MAX),
                    column: u32::try_from(column).unwrap_or(u32::MAX),
                    path,
                    message: match now {
                        Some(_) => format!(
                            "cluster {} of region {} is named no longer, but release {id}, \
                             under way, steers it",
                            cluster.name, region.name
                        ),
                        None => format!(
                            "region {} is named no longer, but release {id}, under way, \
                             steers its cluster {}",
                            region.name, cluster.name
                        ),
                    },
                    help: format!(
                        "{id} goes on with the clusters it started with until it ends (it sends \
                         that cluster's agent its steps, and waits for it); the clusters named \
                         here are the next release's"
                    ),
                });
            }
        }
    }
    out
}

/// Why a release of `manifest` may not start, if it may not: a region of it another
/// service's release under way steers.
pub fn refuse_release(
    held: &BTreeMap<String, Holder>,
    manifest: &fleet::Manifest,
) -> Option<String> {
    let (region, holder) = (manifest.regions.iter()).find_map(|r| {
        let holder = held.get(&r.name)?;
        matches!(holder, Holder::Release { .. }).then_some((&r.name, holder))
    })?;
    Some(format!(
        "region \"{region}\" of service {} is {holder}: wait for that release to end, or abort \
         it; nothing changed",
        manifest.service.name
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(service: &str, regions: &[&str]) -> fleet::Manifest {
        let quick = include_str!("../../deploy/examples/quick.yaml");
        let renamed = [("us-west", 0), ("us-east", 1), ("eu-west", 2)]
            .into_iter()
            .fold(
                quick.replacen("name: demo", &format!("name: {service}"), 1),
                |m, (r, i)| m.replace(r, regions[i]),
            );
        fleet::load(&renamed).unwrap().manifest
    }

    #[test]
    fn a_region_of_another_fleet_is_refused_unless_this_fleet_had_it_and_one_being_steered_always()
    {
        let fleet = |s: &str| Holder::Fleet { service: s.into() };
        let release = Holder::Release {
            service: "demo".into(),
            id: "demo-3".into(),
        };
        let held = BTreeMap::from([
            ("us-west".to_string(), fleet("demo")),
            ("eu-west".to_string(), release),
        ]);
        let shop = manifest("shop", &["a", "us-west", "b"]);
        let refused = refuse_fleet(&held, &[], &shop).unwrap();
        assert!(
            refused.starts_with(
                "regions[1].name: region \"us-west\" is service demo's; nothing changed."
            ),
            "{refused}"
        );
        assert_eq!(
            refuse_fleet(&held, &["us-west".into()], &shop),
            None,
            "had it"
        );
        assert_eq!(refuse_release(&held, &shop), None, "no release steers it");

        let steered = manifest("shop", &["a", "us-west", "eu-west"]);
        let refused = refuse_fleet(&held, &["us-west".into(), "eu-west".into()], &steered);
        assert!(
            refused.unwrap().starts_with(
                "regions[2].name: region \"eu-west\" is steered by service demo's release demo-3, under way;"
            )
        );
        let refused = refuse_release(&held, &steered).unwrap();
        assert!(
            refused.starts_with(
                "region \"eu-west\" of service shop is steered by service demo's release demo-3"
            ),
            "{refused}"
        );
        assert_eq!(
            refuse_fleet(&held, &[], &manifest("shop", &["a", "b", "c"])),
            None
        );
    }

    #[test]
    fn a_cluster_or_region_a_release_under_way_steers_and_an_apply_drops_is_warned_of() {
        let quick = include_str!("../../deploy/examples/quick.yaml");
        let started = fleet::load(quick).unwrap().manifest;
        // us-west's cluster renamed; eu-west gone (from its waves too).
        let src = quick
            .replace("[{ name: usw-a }]", "[{ name: usw-b }]")
            .replace(
                "  - name: eu-west\n    traffic_share: 40\n    clusters: [{ name: euw-a }]\n",
                "",
            )
            .replace("traffic_share: 50", "traffic_share: 90")
            .replace("  - name: last\n    regions: [eu-west]\n", "");
        let now = fleet::load(&src).unwrap().manifest;
        let said = clusters_gone_under(&[("demo-3", &started)], &now, &src);
        let said: Vec<(&str, u32, &str)> = (said.iter())
            .map(|d| (d.path.as_str(), d.line, d.message.as_str()))
            .collect();
        let line = |text: &str| 1 + src.lines().position(|l| l.contains(text)).unwrap() as u32;
        assert_eq!(
            said,
            [
                (
                    "regions[0].clusters",
                    line("usw-b"),
                    "cluster usw-a of region us-west is named no longer, but release demo-3, under way, steers it"
                ),
                (
                    "regions",
                    // The list's own position: its first item.
                    line("- name: us-west"),
                    "region eu-west is named no longer, but release demo-3, under way, steers its cluster euw-a"
                ),
            ]
        );
        // Nothing dropped: nothing said.
        assert!(clusters_gone_under(&[("demo-3", &started)], &started, quick).is_empty());
    }
}
