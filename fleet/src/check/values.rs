//! Checks of single values — names, durations, weights, URLs, time zones — each reporting
//! its own diagnostic and returning `None` when the value is unusable.

use std::time::Duration;

use chrono_tz::Tz;
use fleet_yaml::{Diagnostics, Positions, did_you_mean};

use crate::model::{Weight, WeightError};

/// The context every check writes to: where each path is, and the diagnostics so far.
pub(crate) struct Ctx<'a> {
    pos: &'a Positions,
    diags: &'a mut Diagnostics,
    rules: crate::Rules,
}

impl<'a> Ctx<'a> {
    pub(crate) fn new(pos: &'a Positions, diags: &'a mut Diagnostics, rules: crate::Rules) -> Self {
        Ctx { pos, diags, rules }
    }

    /// An error, or under [`crate::Rules::Kept`] a warning: for a rule made stricter since
    /// manifests were first taken.
    fn stricter(&mut self, path: &str, message: String, help: &str) -> bool {
        match self.rules {
            crate::Rules::Now => self.error(path, message, help),
            crate::Rules::Kept => self.warning(path, message, help),
        }
        self.rules == crate::Rules::Now
    }

    pub(crate) fn error(
        &mut self,
        path: &str,
        message: impl Into<String>,
        help: impl Into<String>,
    ) {
        self.diags.error(self.pos.of(path), path, message, help);
    }

    pub(crate) fn warning(
        &mut self,
        path: &str,
        message: impl Into<String>,
        help: impl Into<String>,
    ) {
        self.diags.warning(self.pos.of(path), path, message, help);
    }

    pub(crate) fn line_of(&self, path: &str) -> usize {
        self.pos.of(path).line
    }

    /// A DNS label, as Kubernetes names its objects.
    pub(crate) fn name(&mut self, path: &str, name: &str) -> Option<String> {
        if fleet_yaml::is_dns_label(name) {
            return Some(name.to_string());
        }
        self.error(
            path,
            format!("\"{name}\" is not a valid name"),
            "use at most 63 lowercase letters, digits and '-', starting and ending with a letter or digit",
        );
        None
    }

    /// A duration of at most [`MAX_DURATION`], in units from milliseconds to weeks: months
    /// and years have no fixed length, and `M` (months) is too easily meant as minutes.
    pub(crate) fn duration(&mut self, path: &str, text: &str) -> Option<Duration> {
        if let Some(unit) = fleet_yaml::vague_unit(text) {
            let said = format!("\"{text}\" is in {unit:?}, which is months or years");
            let help = "write minutes as m (5m) and longer times in d or w (30d)";
            if self.stricter(path, said, help) {
                return None;
            }
        }
        match humantime::parse_duration(text) {
            Ok(d) if d > MAX_DURATION => {
                let said = format!("\"{text}\" is longer than 30 days");
                let help = "give at most 30d; to wait for an operator's word, use an \
                            indefinite pause or an approval gate";
                match self.stricter(path, said, help) {
                    true => None,
                    false => Some(d),
                }
            }
            Ok(d) => Some(d),
            Err(_) => {
                self.error(
                    path,
                    format!("\"{text}\" is not a duration"),
                    "write a number and a unit, e.g. 30s, 5m, 1h30m",
                );
                None
            }
        }
    }

    /// A duration that must be longer than zero, such as an interval.
    pub(crate) fn positive_duration(&mut self, path: &str, text: &str) -> Option<Duration> {
        let d = self.duration(path, text)?;
        if d.is_zero() {
            let what = format!("\"{text}\" is no time at all");
            self.error(path, what, "give it a length, e.g. 30s or 10m");
            return None;
        }
        Some(d)
    }

    pub(crate) fn weight(&mut self, path: &str, percent: f64) -> Option<Weight> {
        match Weight::from_percent(percent) {
            Ok(w) => Some(w),
            Err(WeightError::OutOfRange) => {
                self.error(
                    path,
                    format!("weight {percent} is not between 0 and 100"),
                    "weights are percents of the region's traffic",
                );
                None
            }
            Err(WeightError::TooPrecise) => {
                self.error(
                    path,
                    format!("weight {percent} is finer than 0.01"),
                    "round it to two decimals",
                );
                None
            }
        }
    }

    /// An http or https URL.
    pub(crate) fn url(&mut self, path: &str, text: &str) -> Option<String> {
        match url::Url::parse(text) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {
                Some(text.to_string())
            }
            Ok(u) => {
                self.error(
                    path,
                    format!("\"{text}\" is not an http(s) URL (scheme {})", u.scheme()),
                    "use http:// or https://",
                );
                None
            }
            Err(e) => {
                self.error(
                    path,
                    format!("\"{text}\" is not a URL ({e})"),
                    "e.g. https://hooks.example.com/release",
                );
                None
            }
        }
    }

    /// An absolute URL path such as `/healthz`.
    pub(crate) fn url_path(&mut self, path: &str, text: &str) -> Option<String> {
        if text.starts_with('/') && !text.contains(char::is_whitespace) {
            return Some(text.to_string());
        }
        self.error(
            path,
            format!("\"{text}\" is not an absolute path"),
            "start it with /, e.g. /healthz",
        );
        None
    }

    pub(crate) fn time_zone(&mut self, path: &str, text: &str) -> Option<Tz> {
        match text.parse::<Tz>() {
            Ok(tz) => Some(tz),
            Err(_) => {
                let names = chrono_tz::TZ_VARIANTS.iter().map(|tz| tz.name());
                let help = match did_you_mean(text, names) {
                    Some(near) => format!("did you mean \"{near}\"?"),
                    None => "use an IANA time zone such as Europe/Berlin or UTC".to_string(),
                };
                self.error(path, format!("unknown time zone \"{text}\""), help);
                None
            }
        }
    }
}

/// The longest duration a manifest may give anything: a release is not meant to hold a step,
/// a bake or a deadline longer.
pub(crate) const MAX_DURATION: Duration = Duration::from_secs(30 * 24 * 3600);

/// The units of months and years, as the duration parser (humantime) takes them.
/// A duration as the manifest takes one (units from milliseconds to weeks, at most 30 days),
/// for a command-line flag: else what is wrong with `text` and the fix.
pub fn duration(text: &str) -> Result<Duration, String> {
    let mut diags = Diagnostics::default();
    let pos = Positions::default();
    let d = Ctx::new(&pos, &mut diags, crate::Rules::Now).duration("", text);
    d.ok_or_else(|| {
        let said = (diags.into_sorted().into_iter()).map(|d| format!("{}; {}", d.message, d.help));
        said.collect::<Vec<_>>().join("\n")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The diagnostics on `text` as a manifest's `waves[0].bake`.
    fn at_bake(text: &str) -> Result<Duration, String> {
        let mut diags = Diagnostics::default();
        let pos = Positions::default();
        let d = Ctx::new(&pos, &mut diags, crate::Rules::Now).duration("waves[0].bake", text);
        d.ok_or_else(|| {
            let said = diags.into_sorted().into_iter().map(|d| d.to_string());
            said.collect::<Vec<_>>().join("\n")
        })
    }

    #[test]
    fn a_duration_is_in_units_from_milliseconds_to_weeks_and_at_most_thirty_days() {
        assert_eq!(duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(duration("30d"), Ok(MAX_DURATION));
        assert_eq!(duration("2w"), Ok(Duration::from_secs(14 * 24 * 3600)));
        for (text, said) in [
            ("5M", "\"5M\" is in \"M\", which is months or years"),
            ("1year", "is in \"year\""),
            ("1h 2months", "is in \"months\""),
            ("31d", "\"31d\" is longer than 30 days; give at most 30d"),
            ("1000000days", "is longer than 30 days"),
            ("soon", "\"soon\" is not a duration"),
            ("1yr", "is in \"yr\""),
        ] {
            let e = at_bake(text).expect_err(text);
            assert!(e.contains(said), "{text}: {e}");
            assert!(e.contains("waves[0].bake"), "{text}: {e}");
            // A flag's, the same words with no place in a file.
            let e = duration(text).expect_err(text);
            assert!(e.contains(said) && !e.contains("bake"), "{text}: {e}");
        }
    }
}
