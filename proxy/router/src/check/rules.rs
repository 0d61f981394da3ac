//! Rule conditions: headers, cookies, query parameters and methods, each with one test.

use http::{HeaderName, Method};
use std::sync::Arc;

use regex::RegexBuilder;

use super::{At, Builder, REGEX_SIZE_LIMIT};
use crate::rule::{Condition, Test};
use crate::spec::{MatchSpec, ValueMatchSpec};

impl Builder<'_> {
    pub(super) fn conditions(&mut self, at: &At<'_>, spec: &MatchSpec) -> Option<Vec<Condition>> {
        // Sized exactly: a table keeps these for as long as it is in force.
        let given = [
            spec.header.is_some(),
            spec.cookie.is_some(),
            spec.query.is_some(),
            spec.method.is_some(),
        ];
        let mut out = Vec::with_capacity(given.into_iter().filter(|g| *g).count());
        let mut ok = true;
        if let Some(h) = &spec.header {
            let field = at.field("header");
            let name = HeaderName::from_bytes(h.name.as_bytes());
            if name.is_err() {
                self.error(
                    &field.field("name"),
                    format!("bad header name \"{}\"", h.name),
                    "use letters, digits and `-`",
                );
            }
            // The test is checked too, bad name or not: every problem at once.
            match (name, self.test(&field, h)) {
                (Ok(name), Some(test)) => out.push(Condition::Header(name, test)),
                _ => ok = false,
            }
        }
        for (kind, spec, make) in [
            (
                "cookie",
                &spec.cookie,
                Condition::Cookie as fn(String, Test) -> Condition,
            ),
            ("query", &spec.query, Condition::Query),
        ] {
            let Some(v) = spec else { continue };
            let field = at.field(kind);
            if v.name.is_empty() {
                self.error(&field.field("name"), "empty name", "name the value to test");
                ok = false;
            }
            match self.test(&field, v) {
                Some(test) => out.push(make(v.name.clone(), test)),
                None => ok = false,
            }
        }
        if let Some(methods) = &spec.method {
            let mut parsed = Vec::new();
            for (i, m) in methods.iter().enumerate() {
                match Method::from_bytes(m.as_bytes()) {
                    Ok(method) if m.bytes().all(|b| b.is_ascii_uppercase()) => parsed.push(method),
                    _ => {
                        self.error(
                            &at.field("method").index(i),
                            format!("bad method \"{m}\""),
                            "use an uppercase method such as GET or POST",
                        );
                        ok = false;
                    }
                }
            }
            if parsed.is_empty() && methods.is_empty() {
                self.error(
                    &at.field("method"),
                    "empty method list",
                    "list at least one method or remove `method`",
                );
                ok = false;
            }
            out.push(Condition::Method(parsed));
        }
        if out.is_empty() && ok {
            self.error(
                at,
                "no condition",
                "add one of: header, cookie, query, method",
            );
            ok = false;
        }
        ok.then_some(out)
    }

    fn test(&mut self, at: &At<'_>, v: &ValueMatchSpec) -> Option<Test> {
        let mut tests = Vec::new();
        if let Some(s) = &v.exact {
            tests.push(Test::Exact(s.clone()));
        }
        if let Some(s) = &v.prefix {
            tests.push(Test::Prefix(s.clone()));
        }
        if let Some(re) = &v.regex {
            let compiled = match self.regexes.get(re) {
                Some(known) => known.clone(),
                // Parsed alone first (syntax only, nothing compiled): wrapped, `x)|(.*`
                // would compile and match anything.
                None => match regex_syntax::Parser::new()
                    .parse(re)
                    .map_err(|e| regex::Error::Syntax(e.to_string()))
                    .and_then(|_| {
                        RegexBuilder::new(&format!("^(?:{re})$"))
                            .size_limit(REGEX_SIZE_LIMIT)
                            .build()
                    }) {
                    Ok(built) => {
                        let built = Arc::new(built);
                        self.regexes.insert(re.clone(), built.clone());
                        built
                    }
                    Err(e) => {
                        // The last line says what is wrong (the lines before quote the
                        // pattern as wrapped here).
                        let text = e.to_string();
                        let message = text.lines().last().unwrap_or_default().trim();
                        let message = message.strip_prefix("error: ").unwrap_or(message);
                        let message = message.trim_end_matches('.');
                        let help = match e {
                            regex::Error::CompiledTooBig(_) => {
                                "write a smaller pattern: fewer or smaller repetitions (`{1000}`), or \
                                 classes such as \\w in place of Unicode ones"
                            }
                            _ => {
                                "check its brackets, parentheses and escapes; the syntax is at https://docs.rs/regex"
                            }
                        };
                        self.error(
                            &at.field("regex"),
                            format!("bad regex \"{re}\": {message}"),
                            help,
                        );
                        return None;
                    }
                },
            };
            tests.push(Test::Regex(compiled));
        }
        match v.present {
            Some(true) => tests.push(Test::Present),
            Some(false) => tests.push(Test::Absent),
            None => {}
        }
        match v.absent {
            Some(true) => tests.push(Test::Absent),
            Some(false) => tests.push(Test::Present),
            None => {}
        }
        match tests.len() {
            1 => tests.pop(),
            0 => {
                self.error(
                    at,
                    "no test",
                    "add one of: exact, prefix, regex, present, absent",
                );
                None
            }
            _ => {
                self.error(at, "more than one test", "keep one of: exact, prefix, regex, present, absent; use several rules to combine");
                None
            }
        }
    }
}
