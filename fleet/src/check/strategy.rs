//! Checks a strategy: exactly one rollout kind, steps that never go down, cohort matches that
//! compile, a mirror share and a sticky key.

use std::time::Duration;

use fleet_yaml::is_token;

use crate::check::Ctx;
use crate::model::{
    AbPhase, Hook, Match, MatchOn, MirrorPhase, Pause, Rollout, Step, Sticky, Strategy, ValueTest,
    Weight,
};
use crate::wire;

const DEFAULT_HOOK_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) fn check(w: &wire::Strategy, path: &str, cx: &mut Ctx<'_>) -> Option<Strategy> {
    let kinds: Vec<&str> = [
        w.canary.as_ref().map(|_| "canary"),
        w.linear.as_ref().map(|_| "linear"),
        w.blue_green.as_ref().map(|_| "blue_green"),
    ]
    .into_iter()
    .flatten()
    .collect();
    let rollout = match kinds.as_slice() {
        [] => {
            cx.error(
                path,
                "the strategy has no rollout kind",
                "add one of: canary, linear, blue_green",
            );
            None
        }
        [_] => rollout(w, path, cx),
        several => {
            cx.error(
                path,
                format!(
                    "the strategy has several rollout kinds: {}",
                    several.join(", ")
                ),
                "keep exactly one of canary, linear or blue_green",
            );
            None
        }
    };
    let ab = w.ab.as_ref().map(|ab| ab_phase(ab, &sub(path, "ab"), cx));
    let mirror = w
        .mirror
        .as_ref()
        .map(|m| mirror_phase(m, &sub(path, "mirror"), cx));
    let sticky = w
        .sticky
        .as_ref()
        .map(|s| sticky(s, &sub(path, "sticky"), cx));
    Some(Strategy {
        rollout: rollout?,
        ab: ab.map_or(Some(None), |a| a.map(Some))?,
        mirror: mirror.map_or(Some(None), |m| m.map(Some))?,
        sticky: sticky.map_or(Some(None), |s| s.map(Some))?,
    })
}

fn rollout(w: &wire::Strategy, path: &str, cx: &mut Ctx<'_>) -> Option<Rollout> {
    if let Some(canary) = &w.canary {
        return canary_steps(&canary.steps, &sub(path, "canary.steps"), cx)
            .map(|steps| Rollout::Canary { steps });
    }
    if let Some(linear) = &w.linear {
        let path = sub(path, "linear");
        let step = cx.weight(&format!("{path}.step_weight"), linear.step_weight);
        let max = match linear.max_weight {
            Some(m) => cx.weight(&format!("{path}.max_weight"), m),
            None => Some(Weight::FULL),
        };
        let interval = cx.positive_duration(&format!("{path}.interval"), &linear.interval);
        let (step, max) = (step?, max?);
        if step == Weight::ZERO {
            cx.error(
                &format!("{path}.step_weight"),
                "step_weight must be above 0",
                "e.g. 10",
            );
            return None;
        }
        if step > max {
            cx.error(
                &format!("{path}.step_weight"),
                format!("step_weight {step} is above max_weight {max}"),
                "lower step_weight or raise max_weight",
            );
            return None;
        }
        return Some(Rollout::Linear {
            step,
            max,
            interval: interval?,
        });
    }
    let bg = w.blue_green.as_ref()?;
    let path = sub(path, "blue_green");
    let smoke = bg
        .smoke
        .as_ref()
        .map(|h| hook(h, &format!("{path}.smoke"), cx));
    let standby = match &bg.standby {
        Some(text) => cx.duration(&format!("{path}.standby"), text),
        None => Some(Duration::ZERO),
    };
    Some(Rollout::BlueGreen {
        smoke: smoke.map_or(Some(None), |h| h.map(Some))?,
        standby: standby?,
    })
}

fn canary_steps(w: &[wire::Step], path: &str, cx: &mut Ctx<'_>) -> Option<Vec<Step>> {
    if w.is_empty() {
        cx.error(
            path,
            "the canary has no steps",
            "add steps, e.g. `- weight: 10` then `- weight: 50`",
        );
        return None;
    }
    let mut steps = Vec::new();
    let mut ok = true;
    let mut previous: Option<Weight> = None;
    for (i, s) in w.iter().enumerate() {
        let spath = format!("{path}[{i}]");
        let weight = cx.weight(&format!("{spath}.weight"), s.weight);
        if let (Some(w), Some(prev)) = (weight, previous)
            && w < prev
        {
            cx.error(
                &format!("{spath}.weight"),
                format!("weight {w} is lower than the previous step's {prev}"),
                "weights never decrease along the steps; reorder or fix them",
            );
        }
        previous = weight.or(previous);
        let pause = match &s.pause {
            None => Some(Pause::None),
            Some(wire::Pause::Indefinite(_)) => Some(Pause::Indefinite),
            Some(wire::Pause::Text(t)) if t == "indefinite" => Some(Pause::Indefinite),
            Some(wire::Pause::Text(t)) => cx.duration(&format!("{spath}.pause"), t).map(Pause::For),
        };
        match (weight, pause) {
            (Some(weight), Some(pause)) => steps.push(Step { weight, pause }),
            _ => ok = false,
        }
    }
    ok.then_some(steps)
}

fn hook(w: &wire::Hook, path: &str, cx: &mut Ctx<'_>) -> Option<Hook> {
    let url = cx.url(&format!("{path}.url"), &w.url);
    let timeout = match &w.timeout {
        Some(t) => cx.positive_duration(&format!("{path}.timeout"), t),
        None => Some(DEFAULT_HOOK_TIMEOUT),
    };
    Some(Hook {
        url: url?,
        timeout: timeout?,
    })
}

fn ab_phase(w: &wire::Ab, path: &str, cx: &mut Ctx<'_>) -> Option<AbPhase> {
    if w.matches.is_empty() {
        cx.error(
            &format!("{path}.match"),
            "the A/B phase matches nothing",
            "add a header, cookie or query match",
        );
    }
    let matches: Vec<Option<Match>> = w
        .matches
        .iter()
        .enumerate()
        .map(|(i, m)| cohort_match(m, &format!("{path}.match[{i}]"), cx))
        .collect();
    let duration = cx.positive_duration(&format!("{path}.duration"), &w.duration);
    Some(AbPhase {
        matches: matches.into_iter().collect::<Option<_>>()?,
        duration: duration?,
    })
}

fn cohort_match(w: &wire::Match, path: &str, cx: &mut Ctx<'_>) -> Option<Match> {
    let kinds = [
        (MatchOn::Header, "header", &w.header),
        (MatchOn::Cookie, "cookie", &w.cookie),
        (MatchOn::Query, "query", &w.query),
    ];
    let present: Vec<_> = kinds.iter().filter(|(_, _, v)| v.is_some()).collect();
    let [(on, key, Some(vm))] = present.as_slice() else {
        cx.error(
            path,
            "a match needs exactly one of header, cookie or query",
            "split it into one match per item",
        );
        return None;
    };
    let path = format!("{path}.{key}");
    if vm.name.trim().is_empty() {
        cx.error(
            &format!("{path}.name"),
            "the name is empty",
            "name the header, cookie or query parameter",
        );
    }
    let tests: Vec<ValueTest> = [
        vm.exact.clone().map(ValueTest::Exact),
        vm.prefix.clone().map(ValueTest::Prefix),
        vm.regex.clone().map(ValueTest::Regex),
        vm.present.map(ValueTest::Present),
    ]
    .into_iter()
    .flatten()
    .collect();
    let [test] = tests.as_slice() else {
        cx.error(
            &path,
            "a match needs exactly one of exact, prefix, regex or present",
            "e.g. `exact: \"true\"`",
        );
        return None;
    };
    if let ValueTest::Regex(re) = test
        && let Err(e) = regex::Regex::new(re)
    {
        // The regex crate explains on several lines; its last one says what is wrong.
        let e = e.to_string();
        let why = e
            .lines()
            .last()
            .unwrap_or_default()
            .trim_start_matches("error: ");
        cx.error(
            &format!("{path}.regex"),
            format!("the regex does not compile: {why}"),
            "fix the pattern",
        );
        return None;
    }
    (!vm.name.trim().is_empty()).then(|| Match {
        on: *on,
        name: vm.name.clone(),
        test: test.clone(),
    })
}

fn mirror_phase(w: &wire::Mirror, path: &str, cx: &mut Ctx<'_>) -> Option<MirrorPhase> {
    let share = cx.weight(&format!("{path}.percent"), w.percent);
    if share == Some(Weight::ZERO) {
        cx.error(
            &format!("{path}.percent"),
            "mirroring 0% copies nothing",
            "use a percent above 0, or remove the mirror phase",
        );
    }
    let duration = cx.positive_duration(&format!("{path}.duration"), &w.duration);
    Some(MirrorPhase {
        share: share.filter(|s| *s > Weight::ZERO)?,
        duration: duration?,
        compare: w.compare,
    })
}

fn sticky(w: &wire::Sticky, path: &str, cx: &mut Ctx<'_>) -> Option<Sticky> {
    match (&w.cookie, &w.header) {
        (Some(c), None) if is_token(c) => Some(Sticky::Cookie(c.clone())),
        (None, Some(h)) if is_token(h) => Some(Sticky::Header(h.to_ascii_lowercase())),
        (Some(name), None) | (None, Some(name)) => {
            cx.error(
                path,
                format!("\"{name}\" is not a valid cookie or header name"),
                "use letters, digits and -_.",
            );
            None
        }
        _ => {
            cx.error(
                path,
                "sticky needs exactly one of cookie or header",
                "e.g. `sticky: { cookie: fleet-bucket }`",
            );
            None
        }
    }
}

/// `path.key`, or `key` for a strategy checked on its own (a release's override).
fn sub(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}
