//! The semantic checks: turn a well-formed [`wire::Manifest`] into a [`Manifest`], reporting
//! every cross-field problem (unknown or duplicated names, waves, weights, durations, time
//! zones) and every risky-but-legal choice as a warning.

mod analysis;
pub(crate) mod strategy;
mod timing;
mod values;

use std::collections::HashMap;

use fleet_yaml::{Diagnostics, Positions, suggest};

use crate::model::{
    Autoscale, Cluster, DEFAULT_CPU_PERCENT, DEFAULT_PROGRESS_DEADLINE, Manifest, Region, Service,
    Wave, Workload,
};
use crate::wire;

pub(crate) use values::Ctx;
pub use values::duration;

/// Above this share of global traffic, a first wave is flagged as risky.
const FIRST_WAVE_SHARE_WARNING: f64 = 10.0;

pub(crate) fn manifest(
    w: &wire::Manifest,
    pos: &Positions,
    diags: &mut Diagnostics,
    rules: crate::Rules,
) -> Option<Manifest> {
    let cx = &mut Ctx::new(pos, diags, rules);
    if w.api_version != "fleet/v1" {
        cx.error(
            "apiVersion",
            format!("unsupported apiVersion \"{}\"", w.api_version),
            "write `apiVersion: fleet/v1`",
        );
    }
    let service = service(&w.service, cx);
    let regions = regions(&w.regions, cx);
    let waves = waves(&w.waves, &w.regions, cx);
    let default_strategy = strategy::check(&w.strategy, "strategy", cx);
    let analysis = w.analysis.as_ref().and_then(|a| analysis::check(a, cx));
    if w.analysis.as_ref().is_none_or(|a| a.gates.is_empty()) {
        let path = if w.analysis.is_some() {
            "analysis.gates"
        } else {
            ""
        };
        cx.warning(
            path,
            "no analysis gates: nothing stops a bad release automatically",
            "add `analysis.gates`, e.g. `- success_rate: { min: 99 }`",
        );
    }
    mirror_gate_without_mirroring(w, cx);
    let schedule = timing::schedule(&w.windows, &w.blackouts, cx);
    let webhooks = timing::webhooks(&w.webhooks, cx);
    let progress_deadline = match &w.progress_deadline {
        Some(text) => cx.positive_duration("progress_deadline", text),
        None => Some(DEFAULT_PROGRESS_DEADLINE),
    };
    first_wave_exposure(w, cx);
    Some(Manifest {
        service: service?,
        regions: regions?,
        waves: waves?,
        strategy: default_strategy?,
        analysis,
        schedule: schedule?,
        webhooks: webhooks?,
        on_failure: w.on_failure.unwrap_or_default(),
        progress_deadline: progress_deadline?,
    })
}

/// A `mirror_match_rate` gate is judged in mirror phases only: with none anywhere, it judges
/// nothing, which is likely a mistake (a release started with another strategy may still
/// have one, so this is a warning).
fn mirror_gate_without_mirroring(w: &wire::Manifest, cx: &mut Ctx<'_>) {
    let Some(analysis) = &w.analysis else { return };
    let Some(i) = analysis
        .gates
        .iter()
        .position(|g| matches!(g, wire::Gate::MirrorMatchRate(_)))
    else {
        return;
    };
    let mut strategies = std::iter::once(&w.strategy)
        .chain(w.regions.iter().filter_map(|r| r.strategy.as_ref()))
        .chain(w.waves.iter().filter_map(|wave| wave.strategy.as_ref()));
    if strategies.all(|s| s.mirror.is_none()) {
        cx.warning(
            &format!("analysis.gates[{i}].mirror_match_rate"),
            "no strategy has a mirror phase: this gate judges only mirror phases, so it judges nothing",
            "add `strategy.mirror: { percent: 10, duration: 10m }`, or remove the gate",
        );
    }
}

fn service(w: &wire::Service, cx: &mut Ctx<'_>) -> Option<Service> {
    let name = cx.name("service.name", &w.name);
    let host = w.host.clone().unwrap_or_else(|| "*".into());
    if !valid_host_pattern(&host) {
        cx.error(
            "service.host",
            format!("\"{host}\" is not a host name"),
            "use an exact host (api.example.com), a wildcard (*.example.com) or *",
        );
    }
    let path = cx.url_path("service.path", w.path.as_deref().unwrap_or("/"));
    let health_check = cx.url_path(
        "service.health_check",
        w.health_check.as_deref().unwrap_or("/healthz"),
    );
    let workload = &w.workload;
    if workload.image.is_none() && workload.command.is_none() {
        cx.error(
            "service.workload",
            "the workload has neither an image nor a command",
            "set `image:` for Kubernetes, `command:` for local processes, or both",
        );
    }
    if workload
        .command
        .as_ref()
        .is_some_and(|c| c.first().is_none_or(|p| p.trim().is_empty()))
    {
        cx.error(
            "service.workload.command",
            "the command is empty",
            "name the program first, e.g. [\"./app\", \"--port\", \"{port}\"]",
        );
    }
    let resources = workload.resources.clone().unwrap_or_default();
    if let Some(cpu) = &resources.cpu
        && !is_quantity(cpu, &["m"])
    {
        cx.error(
            "service.workload.resources.cpu",
            format!("\"{cpu}\" is not a CPU quantity"),
            "write cores (1, 0.5) or millicores (250m)",
        );
    }
    if let Some(memory) = &resources.memory
        && !is_quantity(memory, &["Ki", "Mi", "Gi", "Ti", "k", "M", "G", "T"])
    {
        cx.error(
            "service.workload.resources.memory",
            format!("\"{memory}\" is not a memory quantity"),
            "write bytes with a suffix: 256Mi, 1Gi, 500M",
        );
    }
    if workload.run_as_user == Some(0) {
        cx.error(
            "service.workload.run_as_user",
            "0 is root, which the restricted profile forbids",
            "give the non-root uid the image runs as (e.g. 65532), or leave run_as_user out",
        );
    }
    if workload.replicas == Some(0) {
        cx.error(
            "service.workload.replicas",
            "replicas must be at least 1",
            "",
        );
    }
    let autoscale = workload
        .autoscale
        .as_ref()
        .and_then(|a| autoscale(a, workload, cx));
    Some(Service {
        name: name?,
        host,
        path: path?,
        health_check: health_check?,
        workload: Workload {
            image: workload.image.clone(),
            command: workload.command.clone(),
            replicas: autoscale.map_or(workload.replicas.unwrap_or(1), |a| a.min),
            resources,
            run_as_user: workload.run_as_user,
            autoscale,
        },
    })
}

/// An autoscaler's bounds and target, checked against the rest of the workload.
fn autoscale(a: &wire::Autoscale, w: &wire::Workload, cx: &mut Ctx<'_>) -> Option<Autoscale> {
    const PATH: &str = "service.workload.autoscale";
    let mut ok = true;
    if w.replicas.is_some() {
        ok = false;
        cx.error(
            "service.workload.replicas",
            "replicas and autoscale both set: the autoscaler decides how many instances run",
            "remove `replicas` (the process driver runs `autoscale.min`), or remove `autoscale`",
        );
    }
    if a.min == 0 {
        ok = false;
        let fix = "give at least 1, so that every version keeps an instance to serve";
        cx.error(&format!("{PATH}.min"), "min 0: no instance would run", fix);
    }
    if a.max < a.min {
        ok = false;
        cx.error(
            &format!("{PATH}.max"),
            format!("max {} is below min {}", a.max, a.min),
            "raise max to min or more",
        );
    }
    let cpu_percent = a.cpu_percent.unwrap_or(DEFAULT_CPU_PERCENT);
    if !(1..=1000).contains(&cpu_percent) {
        ok = false;
        cx.error(
            &format!("{PATH}.cpu_percent"),
            format!("cpu_percent {cpu_percent} is not between 1 and 1000"),
            "give the average CPU use to keep, in percent of resources.cpu, e.g. 70",
        );
    }
    if w.resources.as_ref().is_none_or(|r| r.cpu.is_none()) {
        ok = false;
        cx.error(
            PATH,
            "autoscaling on CPU needs each instance's CPU request, which is not set",
            "set `resources.cpu` (e.g. 250m): the autoscaler keeps use at cpu_percent of it",
        );
    }
    ok.then_some(Autoscale {
        min: a.min,
        max: a.max,
        cpu_percent,
    })
}

/// Whether `s` is a positive decimal number with one of `suffixes` or none, as Kubernetes
/// writes the quantities people write (`250m`, `0.5`, `256Mi`).
fn is_quantity(s: &str, suffixes: &[&str]) -> bool {
    let number = suffixes
        .iter()
        .find_map(|suffix| s.strip_suffix(suffix))
        .unwrap_or(s);
    let mut parts = number.splitn(2, '.');
    let whole = parts.next().unwrap_or_default();
    let all_digits = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
    all_digits(whole)
        && parts.next().is_none_or(all_digits)
        && number.bytes().any(|b| (b'1'..=b'9').contains(&b))
}

fn regions(w: &[wire::Region], cx: &mut Ctx<'_>) -> Option<Vec<Region>> {
    if w.is_empty() {
        cx.error(
            "regions",
            "the fleet has no regions",
            "list at least one region",
        );
    }
    let mut names = Unique::new("region");
    let mut clusters = Unique::new("cluster");
    let mut agents = Unique::new("agent");
    let mut out = Vec::new();
    let mut ok = true;
    for (i, r) in w.iter().enumerate() {
        let path = format!("regions[{i}]");
        let name = cx.name(&format!("{path}.name"), &r.name);
        names.add(cx, &format!("{path}.name"), &r.name);
        if !(0.0..=100.0).contains(&r.traffic_share) {
            cx.error(
                &format!("{path}.traffic_share"),
                format!("traffic share {} is not a percentage", r.traffic_share),
                "give the region's percent of global traffic, from 0 to 100",
            );
        }
        if r.clusters.is_empty() {
            cx.error(
                &format!("{path}.clusters"),
                "the region has no clusters",
                "list the clusters that serve it",
            );
        }
        let mut region_clusters = Vec::new();
        for (j, c) in r.clusters.iter().enumerate() {
            let cpath = format!("{path}.clusters[{j}]");
            let agent = c.agent.clone().unwrap_or_else(|| c.name.clone());
            let cname = cx.name(&format!("{cpath}.name"), &c.name);
            clusters.add(cx, &format!("{cpath}.name"), &c.name);
            let agent_path = match c.agent.is_some() {
                true => format!("{cpath}.agent"),
                false => format!("{cpath}.name"),
            };
            agents.add(cx, &agent_path, &agent);
            // The agent says it in its hello, which the controller refuses unless it is a
            // name. A warning, not an error: a fleet stored before this check must still load.
            if c.agent.is_some() && !fleet_yaml::is_dns_label(&agent) {
                cx.warning(
                    &agent_path,
                    format!("agent \"{agent}\" is not a name, so the controller refuses its hello and the region never becomes reachable"),
                    "use at most 63 lowercase letters, digits and '-', starting and ending with a letter or digit",
                );
            }
            if let Some(cname) = cname {
                region_clusters.push(Cluster { name: cname, agent });
            }
        }
        let strategy = match &r.strategy {
            Some(s) => strategy::check(s, &format!("{path}.strategy"), cx).map(Some),
            None => Some(None),
        };
        match (name, strategy) {
            (Some(name), Some(strategy)) => out.push(Region {
                name,
                clusters: region_clusters,
                traffic_share: r.traffic_share,
                strategy,
            }),
            _ => ok = false,
        }
    }
    let total: f64 = w.iter().map(|r| r.traffic_share).sum();
    if !w.is_empty() && (total - 100.0).abs() > 0.01 {
        cx.warning(
            "regions",
            format!("traffic shares add up to {}%, not 100%", round2(total)),
            "exposure estimates read each share as a percent of global traffic",
        );
    }
    ok.then_some(out)
}

fn waves(w: &[wire::Wave], regions: &[wire::Region], cx: &mut Ctx<'_>) -> Option<Vec<Wave>> {
    if w.is_empty() {
        cx.error(
            "waves",
            "the fleet has no waves, so a release reaches no region",
            "add a wave listing regions",
        );
    }
    let known: Vec<&str> = regions.iter().map(|r| r.name.as_str()).collect();
    let mut names = Unique::new("wave");
    let mut placed: HashMap<&str, &str> = HashMap::new();
    let mut out = Vec::new();
    let mut ok = true;
    for (i, wave) in w.iter().enumerate() {
        let path = format!("waves[{i}]");
        let name = cx.name(&format!("{path}.name"), &wave.name);
        names.add(cx, &format!("{path}.name"), &wave.name);
        if wave.regions.is_empty() {
            cx.error(
                &format!("{path}.regions"),
                "the wave has no regions",
                "list at least one region, or remove the wave",
            );
        }
        for (j, region) in wave.regions.iter().enumerate() {
            let rpath = format!("{path}.regions[{j}]");
            if !known.contains(&region.as_str()) {
                cx.error(
                    &rpath,
                    format!("unknown region \"{region}\""),
                    suggest(region, &known),
                );
            } else if let Some(first) = placed.insert(region, &wave.name) {
                cx.error(
                    &rpath,
                    format!("region \"{region}\" is already in wave \"{first}\""),
                    "a region belongs to exactly one wave; remove it from one of them",
                );
            }
        }
        let bake = match &wave.bake {
            Some(text) => cx.duration(&format!("{path}.bake"), text),
            None => Some(std::time::Duration::ZERO),
        };
        let strategy = match &wave.strategy {
            Some(s) => strategy::check(s, &format!("{path}.strategy"), cx).map(Some),
            None => Some(None),
        };
        match (name, bake, strategy) {
            (Some(name), Some(bake), Some(strategy)) => out.push(Wave {
                name,
                regions: wave.regions.clone(),
                max_parallel: wave.max_parallel.map(|n| n as usize),
                bake,
                approval: wave.approval == Some(wire::Approval::Required),
                strategy,
            }),
            _ => ok = false,
        }
    }
    for (i, region) in regions.iter().enumerate() {
        if !placed.contains_key(region.name.as_str()) && !w.is_empty() {
            let last = w.last().map(|l| l.name.as_str()).unwrap_or_default();
            cx.error(
                &format!("regions[{i}].name"),
                format!(
                    "region \"{}\" is in no wave, so no release would reach it",
                    region.name
                ),
                format!("add it to the regions of a wave, e.g. \"{last}\""),
            );
        }
    }
    ok.then_some(out)
}

fn first_wave_exposure(w: &wire::Manifest, cx: &mut Ctx<'_>) {
    let Some(first) = w.waves.first() else { return };
    let share: f64 = w
        .regions
        .iter()
        .filter(|r| first.regions.contains(&r.name))
        .map(|r| r.traffic_share)
        .sum();
    if share > FIRST_WAVE_SHARE_WARNING {
        cx.warning(
            "waves[0]",
            format!("the first wave exposes {}% of global traffic", round2(share)),
            format!("start with regions under {FIRST_WAVE_SHARE_WARNING}% so a bad release reaches few users"),
        );
    }
}

fn valid_host_pattern(host: &str) -> bool {
    let name = host.strip_prefix("*.").unwrap_or(host);
    host == "*"
        || (!name.is_empty()
            && name.len() <= 253
            && name.split('.').all(|label| {
                !label.is_empty() && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            }))
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Reports a name seen twice, pointing at the first.
struct Unique<'a> {
    what: &'a str,
    seen: HashMap<String, String>,
}

impl<'a> Unique<'a> {
    fn new(what: &'a str) -> Self {
        Unique {
            what,
            seen: HashMap::new(),
        }
    }

    fn add(&mut self, cx: &mut Ctx<'_>, path: &str, name: &str) {
        match self.seen.get(name) {
            Some(first) => {
                let line = cx.line_of(first);
                cx.error(
                    path,
                    format!(
                        "duplicate {} name \"{name}\" (first used on line {line})",
                        self.what
                    ),
                    format!("give each {} its own name", self.what),
                );
            }
            None => {
                self.seen.insert(name.to_string(), path.to_string());
            }
        }
    }
}

#[cfg(test)]
mod quantity_tests {
    use super::is_quantity;

    #[test]
    fn quantities_are_positive_decimals_with_a_known_suffix() {
        let memory = ["Ki", "Mi", "Gi", "Ti", "k", "M", "G", "T"];
        for ok in ["250m", "0.5", "1", "2"] {
            assert!(is_quantity(ok, &["m"]), "{ok}");
        }
        for ok in ["256Mi", "1.5Gi", "500M", "1048576"] {
            assert!(is_quantity(ok, &memory), "{ok}");
        }
        for bad in [
            "0", "0m", "-1", "1.", ".5", "m", "1x", "2 GB", "1e3", "", "256mi",
        ] {
            assert!(!is_quantity(bad, &memory), "{bad}");
            assert!(!is_quantity(bad, &["m"]), "{bad}");
        }
    }
}
