//! Checks windows, blackouts and webhooks.

use std::time::Duration;

use chrono::{NaiveDate, NaiveTime, Weekday};
use chrono_tz::Tz;

use crate::check::Ctx;
use crate::model::Webhook;
use crate::schedule::{Blackout, Schedule, Window, WindowError};
use crate::wire;

const DEFAULT_WEBHOOK_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) fn schedule(
    windows: &[wire::Window],
    blackouts: &[wire::Blackout],
    cx: &mut Ctx<'_>,
) -> Option<Schedule> {
    let windows: Vec<Option<Window>> = windows
        .iter()
        .enumerate()
        .map(|(i, w)| window(w, &format!("windows[{i}]"), cx))
        .collect();
    let blackouts: Vec<Option<Blackout>> = blackouts
        .iter()
        .enumerate()
        .map(|(i, b)| blackout(b, &format!("blackouts[{i}]"), cx))
        .collect();
    Some(Schedule {
        windows: windows.into_iter().collect::<Option<_>>()?,
        blackouts: blackouts.into_iter().collect::<Option<_>>()?,
    })
}

fn window(w: &wire::Window, path: &str, cx: &mut Ctx<'_>) -> Option<Window> {
    let from = time(&format!("{path}.from"), &w.from, cx);
    let to = time(&format!("{path}.to"), &w.to, cx);
    let tz = cx.time_zone(&format!("{path}.tz"), &w.tz);
    let days = w.days.iter().map(|d| weekday(*d)).collect();
    match Window::new(days, from?, to?, tz?) {
        Ok(window) => Some(window),
        Err(WindowError::NoDays) => {
            cx.error(
                &format!("{path}.days"),
                "the window never opens: it has no days",
                "list days, e.g. [mon, tue, wed]",
            );
            None
        }
        Err(WindowError::Empty) => {
            cx.error(
                &format!("{path}.to"),
                format!("the window never opens: it closes when it opens ({})", w.to),
                "set `to` later than `from` (or earlier, for a window past midnight)",
            );
            None
        }
    }
}

fn blackout(w: &wire::Blackout, path: &str, cx: &mut Ctx<'_>) -> Option<Blackout> {
    let from = date(&format!("{path}.from"), &w.from, cx);
    let to = match &w.to {
        Some(t) => date(&format!("{path}.to"), t, cx),
        None => from,
    };
    let tz = match &w.tz {
        Some(t) => cx.time_zone(&format!("{path}.tz"), t),
        None => Some(Tz::UTC),
    };
    let (from, to, tz) = (from?, to?, tz?);
    let blackout = Blackout::new(from, to, tz, w.reason.clone());
    if blackout.is_none() {
        cx.error(
            &format!("{path}.to"),
            format!("the blackout ends ({to}) before it starts ({from})"),
            "swap from and to",
        );
    }
    blackout
}

pub(crate) fn webhooks(w: &[wire::Webhook], cx: &mut Ctx<'_>) -> Option<Vec<Webhook>> {
    let hooks: Vec<Option<Webhook>> = w
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let path = format!("webhooks[{i}]");
            let url = cx.url(&format!("{path}.url"), &h.url);
            let timeout = match &h.timeout {
                Some(t) => cx.positive_duration(&format!("{path}.timeout"), t),
                None => Some(DEFAULT_WEBHOOK_TIMEOUT),
            };
            Some(Webhook {
                on: h.on,
                url: url?,
                timeout: timeout?,
            })
        })
        .collect();
    hooks.into_iter().collect()
}

fn time(path: &str, text: &str, cx: &mut Ctx<'_>) -> Option<NaiveTime> {
    let parsed = NaiveTime::parse_from_str(text, "%H:%M").ok();
    if parsed.is_none() {
        cx.error(
            path,
            format!("\"{text}\" is not a time of day"),
            "write HH:MM in 24-hour time, e.g. 09:30",
        );
    }
    parsed
}

fn date(path: &str, text: &str, cx: &mut Ctx<'_>) -> Option<NaiveDate> {
    let parsed = NaiveDate::parse_from_str(text, "%Y-%m-%d").ok();
    if parsed.is_none() {
        cx.error(
            path,
            format!("\"{text}\" is not a date"),
            "write YYYY-MM-DD, e.g. 2026-12-24",
        );
    }
    parsed
}

fn weekday(day: wire::Day) -> Weekday {
    match day {
        wire::Day::Mon => Weekday::Mon,
        wire::Day::Tue => Weekday::Tue,
        wire::Day::Wed => Weekday::Wed,
        wire::Day::Thu => Weekday::Thu,
        wire::Day::Fri => Weekday::Fri,
        wire::Day::Sat => Weekday::Sat,
        wire::Day::Sun => Weekday::Sun,
    }
}
