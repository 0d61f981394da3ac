//! The structural check: walks a YAML tree against the JSON Schema of the wire types and
//! reports every misplaced, misspelt, missing or mistyped field at once, with its position.
//!
//! It understands the subset of JSON Schema that `schemars` emits for our types: `$ref`,
//! `type`, `properties`, `required`, `additionalProperties`, `items`, `enum`, `const`,
//! `anyOf`/`oneOf` and `minimum`/`maximum`. While it walks it builds the JSON value that serde
//! then reads, and remembers where every path stands in the source for the semantic checks.

use std::collections::{HashMap, HashSet};

use serde_json::{Map, Number, Value as Json};

use crate::diag::{Diagnostics, suggest};
use crate::yaml::{Node, Pos, Value};

/// Where each field path (`waves[1].regions[0]`) stands in the source.
#[derive(Clone, Debug, Default)]
pub struct Positions(HashMap<String, Pos>);

impl Positions {
    /// The position of `path`, or of its nearest ancestor present in the source (a defaulted
    /// field has no position of its own).
    pub fn of(&self, path: &str) -> Pos {
        let mut p = path;
        loop {
            if let Some(pos) = self.0.get(p) {
                return *pos;
            }
            match p.rfind(['.', '[']) {
                Some(i) => p = &p[..i],
                None => return self.0.get("").copied().unwrap_or_default(),
            }
        }
    }
}

/// Checks `node` against `schema`; returns the JSON value serde can read (meaningful only when
/// no error was reported) and the positions of every path.
pub fn check(node: &Node, schema: &Json, diags: &mut Diagnostics) -> (Json, Positions) {
    let mut walker = Walker {
        root: schema,
        positions: Positions::default(),
    };
    let value = walker.walk(node, schema, "", diags);
    (value, walker.positions)
}

struct Walker<'s> {
    root: &'s Json,
    positions: Positions,
}

impl<'s> Walker<'s> {
    fn walk(&mut self, node: &Node, schema: &'s Json, path: &str, diags: &mut Diagnostics) -> Json {
        self.positions.0.insert(path.to_string(), node.pos);
        let schema = self.resolve(schema);
        if let Some(branches) = schema.get("anyOf").or_else(|| schema.get("oneOf")) {
            return self.walk_union(node, branches, path, diags);
        }
        if let Some(allowed) = allowed_values(schema) {
            return walk_enum(node, &allowed, path, diags);
        }
        let types = types_of(schema);
        let Some(ty) = types.iter().copied().find(|t| accepts(t, &node.value)) else {
            mismatch(node, &types, path, diags);
            return Json::Null;
        };
        match (ty, &node.value) {
            ("object", Value::Map(_)) => self.walk_object(node, schema, path, diags),
            ("array", Value::Seq(items)) => {
                let item_schema = schema.get("items").unwrap_or(&Json::Bool(true));
                let values = items
                    .iter()
                    .enumerate()
                    .map(|(i, item)| self.walk(item, item_schema, &format!("{path}[{i}]"), diags))
                    .collect();
                Json::Array(values)
            }
            (_, Value::Scalar { text, .. }) => scalar(ty, text, node.pos, schema, path, diags),
            _ => Json::Null,
        }
    }

    fn walk_object(
        &mut self,
        node: &Node,
        schema: &'s Json,
        path: &str,
        diags: &mut Diagnostics,
    ) -> Json {
        let Value::Map(entries) = &node.value else {
            return Json::Null;
        };
        static EMPTY: std::sync::LazyLock<Map<String, Json>> = std::sync::LazyLock::new(Map::new);
        let properties = schema
            .get("properties")
            .and_then(Json::as_object)
            .unwrap_or(&EMPTY);
        // Fields not among `properties`: refused (`false`), or each checked against the
        // schema given (a map's values), or anything (absent).
        let others = schema
            .get("additionalProperties")
            .unwrap_or(&Json::Bool(true));
        let closed = others == &Json::Bool(false);
        let mut out = Map::new();
        let mut seen = HashSet::new();
        for entry in entries {
            let child = join(path, &entry.key);
            if !seen.insert(entry.key.as_str()) {
                diags.error(
                    entry.key_pos,
                    &child,
                    format!("duplicate key \"{}\"", entry.key),
                    "keep one of them",
                );
                continue;
            }
            match properties.get(&entry.key) {
                Some(prop) => {
                    let value = self.walk(&entry.value, prop, &child, diags);
                    out.insert(entry.key.clone(), value);
                }
                None if closed => {
                    let names: Vec<&str> = properties.keys().map(String::as_str).collect();
                    diags.error(
                        entry.key_pos,
                        &child,
                        format!("unknown field \"{}\"", entry.key),
                        suggest(&entry.key, &names),
                    );
                }
                None => {
                    let value = self.walk(&entry.value, others, &child, diags);
                    out.insert(entry.key.clone(), value);
                }
            }
        }
        let required = schema.get("required").and_then(Json::as_array);
        for name in required.into_iter().flatten().filter_map(Json::as_str) {
            if !seen.contains(name) {
                let what = properties
                    .get(name)
                    .map(|p| self.resolve(p))
                    .and_then(|p| p.get("description"))
                    .and_then(Json::as_str)
                    .map(first_sentence)
                    .unwrap_or_default();
                let help = match what.is_empty() {
                    true => format!("add `{name}:`"),
                    false => format!("add `{name}:` ({what})"),
                };
                diags.error(node.pos, path, format!("missing field \"{name}\""), help);
            }
        }
        Json::Object(out)
    }

    /// `anyOf`/`oneOf`: picks the branch the node can be, by its kind and, for externally
    /// tagged enums (objects with one required key each), by its key.
    fn walk_union(
        &mut self,
        node: &Node,
        branches: &'s Json,
        path: &str,
        diags: &mut Diagnostics,
    ) -> Json {
        let branches: Vec<&'s Json> = branches
            .as_array()
            .map(|b| b.iter().map(|s| self.resolve(s)).collect())
            .unwrap_or_default();
        if let Some(allowed) = branches
            .iter()
            .map(|b| allowed_values(b))
            .collect::<Option<Vec<_>>>()
        {
            return walk_enum(node, &allowed.concat(), path, diags);
        }
        let fits: Vec<&'s Json> = branches
            .iter()
            .copied()
            .filter(|b| types_of(b).iter().any(|t| accepts(t, &node.value)))
            .collect();
        let tags: Vec<&str> = fits.iter().filter_map(|b| single_tag(b)).collect();
        if let (Value::Map(entries), true) =
            (&node.value, fits.len() > 1 && tags.len() == fits.len())
        {
            return match entries.as_slice() {
                [entry] => match fits
                    .iter()
                    .find(|b| single_tag(b) == Some(entry.key.as_str()))
                {
                    Some(branch) => self.walk(node, branch, path, diags),
                    None => {
                        diags.error(
                            entry.key_pos,
                            &join(path, &entry.key),
                            format!("unknown kind \"{}\"", entry.key),
                            suggest(&entry.key, &tags),
                        );
                        Json::Null
                    }
                },
                _ => {
                    diags.error(
                        node.pos,
                        path,
                        format!("expected exactly one key, found {}", entries.len()),
                        format!("use one of: {}", tags.join(", ")),
                    );
                    Json::Null
                }
            };
        }
        match fits.as_slice() {
            [] => {
                let mut types: Vec<&str> = branches.iter().flat_map(|b| types_of(b)).collect();
                types.dedup();
                mismatch(node, &types, path, diags);
                Json::Null
            }
            [only] => self.walk(node, only, path, diags),
            several => {
                // Try each; keep the first that fits cleanly, else the one with fewest problems.
                let mut best: Option<(Json, Diagnostics, usize)> = None;
                for branch in several {
                    let mut scratch = Diagnostics::default();
                    let value = self.walk(node, branch, path, &mut scratch);
                    let problems = scratch.len();
                    if best.as_ref().is_none_or(|(_, _, n)| problems < *n) {
                        best = Some((value, scratch, problems));
                    }
                    if problems == 0 {
                        break;
                    }
                }
                let (value, scratch, _) = best.unwrap_or((Json::Null, Diagnostics::default(), 0));
                diags.extend(scratch);
                value
            }
        }
    }

    fn resolve(&self, mut schema: &'s Json) -> &'s Json {
        while let Some(reference) = schema.get("$ref").and_then(Json::as_str) {
            let Some(name) = reference.strip_prefix("#/$defs/") else {
                break;
            };
            match self.root.get("$defs").and_then(|d| d.get(name)) {
                Some(target) => schema = target,
                None => break,
            }
        }
        schema
    }
}

fn walk_enum(node: &Node, allowed: &[&str], path: &str, diags: &mut Diagnostics) -> Json {
    match &node.value {
        Value::Scalar { text, .. } if allowed.contains(&text.as_str()) => {
            Json::String(text.clone())
        }
        Value::Scalar { text, .. } => {
            diags.error(
                node.pos,
                path,
                format!("unknown value \"{text}\""),
                suggest(text, allowed),
            );
            Json::Null
        }
        other => {
            diags.error(
                node.pos,
                path,
                format!(
                    "expected one of {}, found {}",
                    allowed.join(", "),
                    other.kind()
                ),
                "write one of them, alone",
            );
            Json::Null
        }
    }
}

fn scalar(
    ty: &str,
    text: &str,
    pos: Pos,
    schema: &Json,
    path: &str,
    diags: &mut Diagnostics,
) -> Json {
    match ty {
        "null" => Json::Null,
        "boolean" => Json::Bool(text.eq_ignore_ascii_case("true")),
        "integer" | "number" => {
            let number = match ty {
                "integer" => text.parse::<i64>().ok().map(Number::from),
                _ => text.parse::<f64>().ok().and_then(Number::from_f64),
            };
            // A whole number past i64 (`accepts` let it through) is still held to its range,
            // so that it is told as too large rather than as not a number.
            let value = match &number {
                Some(number) => number.as_f64().unwrap_or_default(),
                None if ty == "integer" => text.parse::<f64>().unwrap_or(f64::INFINITY),
                None => return Json::Null,
            };
            let max = schema
                .get("maximum")
                .and_then(Json::as_f64)
                .or(match schema.get("format") {
                    Some(f) if f == "uint32" => Some(f64::from(u32::MAX)),
                    _ => None,
                });
            // Out of range: reported, then read as the bound it passed, so that the document
            // can still be deserialized and checked further (every problem at once).
            let bound = |b: f64| match ty {
                "integer" => Number::from(b as i64),
                _ => Number::from_f64(b).unwrap_or_else(|| Number::from(0)),
            };
            if let Some(min) = schema
                .get("minimum")
                .and_then(Json::as_f64)
                .filter(|m| value < *m)
            {
                diags.error(
                    pos,
                    path,
                    format!("{text} is below the minimum of {min}"),
                    format!("use {min} or more"),
                );
                return Json::Number(bound(min));
            } else if let Some(max) = max.filter(|m| value > *m) {
                diags.error(
                    pos,
                    path,
                    format!("{text} is above the maximum of {max}"),
                    format!("use {max} or less"),
                );
                return Json::Number(bound(max));
            }
            let Some(number) = number else {
                diags.error(
                    pos,
                    path,
                    format!("{text} is too large a number"),
                    format!("use a whole number from {} to {}", i64::MIN, i64::MAX),
                );
                return Json::Null;
            };
            Json::Number(number)
        }
        _ => Json::String(text.to_string()),
    }
}

/// The JSON types a schema allows; a schema without `type` allows anything.
fn types_of(schema: &Json) -> Vec<&str> {
    match schema.get("type") {
        Some(Json::String(t)) => vec![t.as_str()],
        Some(Json::Array(ts)) => ts.iter().filter_map(Json::as_str).collect(),
        _ if schema.get("properties").is_some() => vec!["object"],
        _ => vec![
            "null", "boolean", "integer", "number", "string", "array", "object",
        ],
    }
}

fn accepts(ty: &str, value: &Value) -> bool {
    match (ty, value) {
        ("object", Value::Map(_)) | ("array", Value::Seq(_)) => true,
        ("string", Value::Scalar { .. }) => true,
        (_, Value::Scalar { plain: false, .. }) => false,
        ("null", v) => v.kind() == "null",
        ("boolean", v) => v.kind() == "a boolean",
        ("integer", Value::Scalar { text, .. }) => whole(text),
        ("number", v) => v.kind() == "a number",
        _ => false,
    }
}

/// Written as a whole number (a sign, then digits), whatever its size: one past i64 is out
/// of range, which [`scalar`] tells, not of the wrong kind.
fn whole(text: &str) -> bool {
    let digits = text.strip_prefix(['-', '+']).unwrap_or(text);
    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
}

/// A value of the wrong kind: what was wanted, what was found (with its text, when it is a
/// scalar), and how to write it.
fn mismatch(node: &Node, types: &[&str], path: &str, diags: &mut Diagnostics) {
    let optional = types.contains(&"null");
    let wanted: Vec<&str> = types.iter().copied().filter(|t| *t != "null").collect();
    let expected: Vec<&str> = wanted.iter().map(|t| describe(t)).collect();
    let found = match &node.value {
        Value::Scalar { text, .. } => match node.value.kind() {
            "null" => "null".to_string(),
            "a string" => format!("the string {}", quoted(text)),
            kind => format!("the {} {text}", kind.trim_start_matches("a ")),
        },
        other => other.kind().to_string(),
    };
    let mut help = fix(&wanted, &node.value);
    if optional {
        help.push_str(", or leave the field out");
    }
    let message = format!("expected {}, found {found}", expected.join(" or "));
    diags.error(node.pos, path, message, help);
}

/// How to write a value of one of the `wanted` types in place of `found`.
fn fix(wanted: &[&str], found: &Value) -> String {
    let scalar_wanted = wanted
        .iter()
        .any(|t| matches!(*t, "string" | "integer" | "number" | "boolean"));
    match (wanted, found) {
        (["array"], Value::Scalar { text, plain })
            if found.kind() != "null" && text.chars().count() <= SHOWN =>
        {
            format!("write a list, even of one item: [{}]", as_item(text, *plain))
        }
        (["array"], _) => "write a list: `[a, b]`, or a `- ` line for each item".into(),
        (["object"], _) => {
            "write a mapping: `{ field: value }`, or a `field: value` line for each, indented under this one".into()
        }
        (_, Value::Seq(items)) if scalar_wanted => match items.as_slice() {
            [Node { value: Value::Scalar { text, plain }, .. }] => {
                format!("write the value alone, without brackets: {}", as_item(text, *plain))
            }
            _ => "write one value, not a list".into(),
        },
        (_, Value::Scalar { text, plain: false })
            if wanted.iter().any(|t| accepts(t, &Value::Scalar { text: text.clone(), plain: true })) =>
        {
            format!("write {text} without quotes")
        }
        (["integer"], _) => "write a whole number, without quotes or units".into(),
        (["number"], _) => "write a number, without quotes or units".into(),
        (["boolean"], _) => "write true or false".into(),
        (["string"], _) => "write one value, quoted if it holds `: ` or begins with `[`, `{` or `-`".into(),
        _ => {
            let expected: Vec<&str> = wanted.iter().map(|t| describe(t)).collect();
            format!("write {}", expected.join(" or "))
        }
    }
}

/// How much of a scalar's text a diagnostic shows.
const SHOWN: usize = 40;

/// A scalar's text in quotes, cut short when long.
fn quoted(text: &str) -> String {
    match text.char_indices().nth(SHOWN) {
        Some((end, _)) => format!("{:?}", format!("{}…", &text[..end])),
        None => format!("{text:?}"),
    }
}

/// A scalar as a suggestion writes it so that it reads back the same, in a `[…]` list too:
/// as it was when it was plain and holds nothing YAML would read otherwise, else in single
/// quotes (a quoted value stays a string).
fn as_item(text: &str, plain: bool) -> String {
    let special = |c: char| ",[]{}#&*!|>'\"%@`".contains(c);
    let safe = plain
        && !text.is_empty()
        && text.trim() == text
        && !text.starts_with(['-', '?', ':'])
        && !text.contains(special)
        && !text.contains(": ")
        && !text.ends_with(':');
    match safe {
        true => text.to_string(),
        false => format!("'{}'", text.replace('\'', "''")),
    }
}

fn describe(ty: &str) -> &'static str {
    match ty {
        "object" => "a mapping",
        "array" => "a list",
        "string" => "a string",
        "integer" => "a whole number",
        "number" => "a number",
        "boolean" => "true or false",
        _ => "nothing",
    }
}

/// The string values a schema allows, when it is an `enum` or a `const`.
fn allowed_values(schema: &Json) -> Option<Vec<&str>> {
    if let Some(c) = schema.get("const").and_then(Json::as_str) {
        return Some(vec![c]);
    }
    let values = schema.get("enum")?.as_array()?;
    values.iter().map(Json::as_str).collect()
}

/// For an externally tagged enum variant (an object with exactly one required key), that key.
fn single_tag(schema: &Json) -> Option<&str> {
    match schema.get("required")?.as_array()?.as_slice() {
        [one] => one.as_str(),
        _ => None,
    }
}

fn join(path: &str, key: &str) -> String {
    match path.is_empty() {
        true => key.to_string(),
        false => format!("{path}.{key}"),
    }
}

fn first_sentence(text: &str) -> String {
    let line = text.split('\n').next().unwrap_or_default();
    line.split(". ")
        .next()
        .unwrap_or(line)
        .trim_end_matches('.')
        .to_string()
}

#[cfg(test)]
mod tests {
    use schemars::JsonSchema;
    use serde::Deserialize;

    use super::fix;
    use crate::yaml::{Node, Pos, Value};
    use crate::{Diagnostic, load};

    #[derive(Debug, Deserialize, JsonSchema)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)] // Fields are read through Debug in the tests.
    struct Doc {
        /// The name of the thing.
        name: String,
        #[serde(default)]
        count: Option<u32>,
        #[serde(default)]
        mode: Option<Mode>,
        #[serde(default)]
        items: Vec<Item>,
        #[serde(default)]
        weights: std::collections::BTreeMap<String, u32>,
        #[serde(default)]
        offset: Option<i64>,
    }

    #[derive(Debug, Deserialize, JsonSchema)]
    #[serde(rename_all = "snake_case")]
    enum Mode {
        Fast,
        Slow,
    }

    #[derive(Debug, Deserialize, JsonSchema)]
    #[serde(rename_all = "snake_case", deny_unknown_fields)]
    #[allow(dead_code)]
    enum Item {
        Weight(f64),
        Label(String),
    }

    fn problems(src: &str) -> Vec<String> {
        let loaded = load::<Doc>(src);
        loaded
            .diags
            .into_sorted()
            .iter()
            .map(Diagnostic::to_string)
            .collect()
    }

    #[test]
    fn a_clean_document_reads_without_diagnostics() {
        let loaded =
            load::<Doc>("name: x\ncount: 3\nmode: fast\nitems: [{weight: 1.5}, {label: \"7\"}]\n");
        assert!(loaded.diags.is_empty(), "{:?}", loaded.diags);
        assert!(loaded.value.is_some());
    }

    #[test]
    fn every_structural_problem_is_reported_with_its_position() {
        let cases: &[(&str, &[&str])] = &[
            (
                "nam: x\n",
                &[
                    "1:1: error: nam: unknown field \"nam\"; did you mean \"name\"?",
                    "1:1: error: missing field \"name\"; add `name:` (The name of the thing)",
                ],
            ),
            (
                "name: x\ncount: lots\n",
                &[
                    "2:8: error: count: expected a whole number, found the string \"lots\"; write a whole number, without quotes or units, or leave the field out",
                ],
            ),
            (
                "name: x\ncount: -2\n",
                &["2:8: error: count: -2 is below the minimum of 0; use 0 or more"],
            ),
            (
                "name: x\nweights: { a: -1, b: lots, c: [2] }\n",
                &[
                    "2:15: error: weights.a: -1 is below the minimum of 0; use 0 or more",
                    "2:22: error: weights.b: expected a whole number, found the string \"lots\"; write a whole number, without quotes or units",
                    "2:31: error: weights.c: expected a whole number, found a list; write the value alone, without brackets: 2",
                ],
            ),
            (
                "name: x\ncount: 18446744073709551615\nweights: { a: -99999999999999999999 }\n",
                &[
                    "2:8: error: count: 18446744073709551615 is above the maximum of 4294967295; use 4294967295 or less",
                    "3:15: error: weights.a: -99999999999999999999 is below the minimum of 0; use 0 or more",
                ],
            ),
            (
                "name: x\noffset: 9223372036854775808\n",
                &[
                    "2:9: error: offset: 9223372036854775808 is too large a number; use a whole number from -9223372036854775808 to 9223372036854775807",
                ],
            ),
            (
                "name: x\nmode: fats\n",
                &["2:7: error: mode: unknown value \"fats\"; did you mean \"fast\"?"],
            ),
            (
                "name: x\nname: y\n",
                &["2:1: error: name: duplicate key \"name\"; keep one of them"],
            ),
            (
                "name: x\nitems: [{wieght: 1}]\n",
                &[
                    "2:10: error: items[0].wieght: unknown kind \"wieght\"; did you mean \"weight\"?",
                ],
            ),
            (
                "name: x\nitems: [{weight: 1, label: a}]\n",
                &[
                    "2:9: error: items[0]: expected exactly one key, found 2; use one of: weight, label",
                ],
            ),
            (
                "name: x\nitems: [{weight: inf}]\n",
                &[
                    "2:18: error: items[0].weight: expected a number, found the string \"inf\"; write a number, without quotes or units",
                ],
            ),
            (
                "name: [1]\n",
                &[
                    "1:7: error: name: expected a string, found a list; write the value alone, without brackets: 1",
                ],
            ),
            (
                "name: x\n  bad: indent\n",
                &[
                    "2:6: error: not valid YAML: mapping values are not allowed in this context; quote a value that holds `: `, put a nested field on a line of its own, or close a `[` or `{` left open above",
                ],
            ),
        ];
        for (src, expected) in cases {
            assert_eq!(&problems(src), expected, "for {src:?}");
        }
    }

    #[test]
    fn a_fix_writes_the_value_found_so_that_it_reads_back_the_same() {
        let scalar = |text: &str, plain: bool| Value::Scalar {
            text: text.to_string(),
            plain,
        };
        let one = |item: Value| {
            Value::Seq(vec![Node {
                pos: Pos::default(),
                value: item,
            }])
        };
        for (wanted, found, help) in [
            (
                &["array"][..],
                scalar("eu-west-1", true),
                "write a list, even of one item: [eu-west-1]",
            ),
            (
                &["array"],
                scalar("a,b", true),
                "write a list, even of one item: ['a,b']",
            ),
            (
                &["array"],
                scalar("it's", false),
                "write a list, even of one item: ['it''s']",
            ),
            (
                &["array"],
                scalar("", true),
                "write a list: `[a, b]`, or a `- ` line for each item",
            ),
            (
                &["array"],
                scalar(&"x".repeat(41), true),
                "write a list: `[a, b]`, or a `- ` line for each item",
            ),
            (
                &["integer"],
                scalar("9500", false),
                "write 9500 without quotes",
            ),
            (
                &["number"],
                scalar("inf", false),
                "write a number, without quotes or units",
            ),
            (
                &["string"],
                one(scalar("a: b", false)),
                "write the value alone, without brackets: 'a: b'",
            ),
            (
                &["string"],
                one(scalar("1m", true)),
                "write the value alone, without brackets: 1m",
            ),
        ] {
            assert_eq!(fix(wanted, &found), help, "{found:?}");
        }
    }

    #[test]
    fn a_number_out_of_range_is_read_as_its_bound_so_that_later_checks_still_run() {
        let loaded = load::<Doc>("name: x\ncount: -2\nweights: { a: 5000000000 }\n");
        assert_eq!(loaded.diags.len(), 2, "{:?}", loaded.diags);
        let doc = loaded.value.expect("still read");
        assert_eq!(doc.count, Some(0));
        assert_eq!(doc.weights["a"], u32::MAX);
    }

    #[test]
    fn plain_scalars_are_strings_where_strings_are_expected() {
        let loaded = load::<Doc>("name: true\n");
        assert_eq!(loaded.value.map(|d| d.name), Some("true".to_string()));
    }

    #[test]
    fn unknown_fields_do_not_hide_the_rest_of_the_document() {
        let loaded = load::<Doc>("name: x\ncolour: red\ncount: 2\n");
        assert!(loaded.diags.has_errors());
        assert_eq!(loaded.value.and_then(|d| d.count), Some(2));
    }
}
