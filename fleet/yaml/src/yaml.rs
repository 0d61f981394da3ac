//! A YAML document as a tree of nodes that remember where they stand in the source.
//!
//! Built from `saphyr-parser` events rather than a ready-made DOM so that duplicate keys are
//! reported (a map would silently keep the last) and quoted scalars stay strings.

use saphyr_parser::{Event, Parser, ScalarStyle, Span};

/// A position in the source: line and column, both 1-based, as editors show them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pos {
    pub line: usize,
    pub column: usize,
}

impl Pos {
    fn from_span(span: Span) -> Self {
        Pos {
            line: span.start.line(),
            column: span.start.col() + 1,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub pos: Pos,
    pub value: Value,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// A scalar as written; `plain` is false for quoted and block scalars, which are always
    /// strings.
    Scalar {
        text: String,
        plain: bool,
    },
    Seq(Vec<Node>),
    /// Entries in source order; keys are scalars (complex keys are rejected at load time).
    Map(Vec<Entry>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub key: String,
    pub key_pos: Pos,
    pub value: Node,
}

/// A document that could not be read as YAML at all.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct SyntaxError {
    pub pos: Pos,
    pub message: String,
    /// How to fix it.
    pub help: String,
}

impl SyntaxError {
    fn new(pos: Pos, message: impl Into<String>, help: impl Into<String>) -> Self {
        SyntaxError {
            pos,
            message: message.into(),
            help: help.into(),
        }
    }

    /// The parser's own error, with the fix for what its message says went wrong.
    fn from_parser(e: &saphyr_parser::ScanError) -> Self {
        let pos = Pos {
            line: e.marker().line(),
            column: e.marker().col() + 1,
        };
        SyntaxError::new(pos, e.info(), syntax_help(e.info()))
    }
}

/// How to fix what the parser's message describes; the parser places most mistakes where it
/// noticed them, which may be a line after the one to fix. Whole phrases of saphyr-parser's
/// messages, most specific first.
fn syntax_help(message: &str) -> &'static str {
    const HELP: &[(&[&str], &str)] = &[
        (
            &[
                "unknown escape character",
                "escape code",
                "hexadecimal number",
            ],
            "in double quotes a backslash begins an escape: write `\\\\` for a backslash, or use single quotes, in which a backslash is itself",
        ),
        (
            &[
                "tab cannot",
                "tabs disallowed",
                "found a tab",
                "start with a tab",
            ],
            "indent with spaces: YAML does not allow tabs for indentation",
        ),
        (
            &["unprintable character"],
            "remove the control character, or save the file as UTF-8 text",
        ),
        (
            &[
                "document start",
                "after document end marker",
                "incompatible YAML document",
            ],
            "remove what follows the document: a file holds one",
        ),
        (
            &["flow sequence", "',' or ']'"],
            "close the list with `]`, or quote an item that holds `,`, `[` or `]`",
        ),
        (
            &["flow mapping", "',' or '}'"],
            "close the mapping with `}`, or quote a value that holds `,`, `{` or `}`",
        ),
        (
            &["quoted scalar"],
            "end the quoted value with the quote it began with, on the value's own line or indented below it",
        ),
        (
            &["':' indicator", "mapping values are not allowed"],
            "quote a value that holds `: `, put a nested field on a line of its own, or close a `[` or `{` left open above",
        ),
        (
            &["did not find expected key", "expected '-' indicator"],
            "indent this line like the other fields at its level, or further, under the field it belongs to",
        ),
        (
            &["misplaced bracket"],
            "remove the extra bracket, or quote a value that begins with one",
        ),
        (
            &["unexpected character"],
            "quote the value: `@`, a backtick and `%` cannot begin an unquoted one",
        ),
        (
            &["unknown anchor"],
            "define the anchor (`&name`) before an alias (`*name`) uses it",
        ),
        (&["duplicated anchor"], "give each anchor its own name"),
        (
            &["anchor or alias"],
            "name an anchor or alias with letters, digits, `-` and `_`, or quote a value that begins with `&` or `*`",
        ),
    ];
    HELP.iter()
        .find(|(phrases, _)| phrases.iter().any(|p| message.contains(p)))
        .map_or(
            "check the indentation and the quotes on this line and the one above",
            |(_, help)| help,
        )
}

impl Value {
    /// What a user would call this kind of value, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Value::Scalar { plain: false, .. } => "a string",
            Value::Scalar { text, .. } => match text.as_str() {
                "" | "~" | "null" | "Null" | "NULL" => "null",
                "true" | "false" | "True" | "False" | "TRUE" | "FALSE" => "a boolean",
                // Not `inf` or `NaN`, which JSON cannot hold.
                t if t.parse::<f64>().is_ok_and(f64::is_finite) => "a number",
                _ => "a string",
            },
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }
}

/// Parses `src`, which must hold one document: the whole source is read, so that nothing
/// after the document (a syntax error, a second document) is silently ignored. An empty
/// source is an empty mapping, so that the checker reports the missing fields rather than a
/// syntax error.
pub fn parse(src: &str) -> Result<Node, SyntaxError> {
    let mut builder = Builder::default();
    let mut root = None;
    for item in Parser::new_from_str(src) {
        let (event, span) = item.map_err(|e| SyntaxError::from_parser(&e))?;
        if root.is_none() {
            root = builder.push(event, span)?;
        } else if holds_content(&event) {
            return Err(SyntaxError::new(
                Pos::from_span(span),
                "a second document begins here, and only the first would be read",
                "remove it, or merge it into the first",
            ));
        }
    }
    Ok(root.unwrap_or(Node {
        pos: Pos { line: 1, column: 1 },
        value: Value::Map(Vec::new()),
    }))
}

/// An event that begins a node, other than the empty scalar of an empty document (a `---`
/// with nothing after it).
fn holds_content(event: &Event<'_>) -> bool {
    match event {
        Event::Scalar(text, style, ..) => !(text.is_empty() && matches!(style, ScalarStyle::Plain)),
        Event::SequenceStart(..) | Event::MappingStart(..) | Event::Alias(_) => true,
        _ => false,
    }
}

/// At most this many bytes (a node's own size, plus its text) may be copied in building one
/// document. Each anchor keeps a copy of its node and each alias makes one, so a few lines of
/// aliases of aliases, nested anchors or one long string aliased many times would otherwise
/// build gigabytes ("billion laughs"), from a config file or a `PUT /routes` body alike.
pub const MAX_COPIED_BYTES: usize = 64 << 20;
/// Collections nest at most this deep (a tree much deeper would overflow the stack when it
/// is cloned or dropped).
pub const MAX_DEPTH: usize = 256;
/// What one node costs, beyond its text.
const NODE_BYTES: usize = std::mem::size_of::<Node>();

/// Turns the event stream into nodes: a stack of open collections, each with the key that
/// waits for its value when it is a mapping.
#[derive(Default)]
struct Builder {
    stack: Vec<Open>,
    /// Each anchor's node and its size in bytes, by id (the parser numbers anchors from 1, a
    /// new number for each, even for a name used again).
    anchors: std::collections::HashMap<usize, (Node, usize)>,
    /// Bytes copied for anchors and aliases so far.
    copied: usize,
}

struct Open {
    node: Node,
    anchor: usize,
    pending_key: Option<(String, Pos)>,
    /// Bytes of what it holds so far.
    bytes: usize,
}

impl Builder {
    fn push(&mut self, event: Event<'_>, span: Span) -> Result<Option<Node>, SyntaxError> {
        let pos = Pos::from_span(span);
        let (node, anchor, bytes) = match event {
            Event::Scalar(text, style, anchor, _tag) => {
                let plain = matches!(style, ScalarStyle::Plain);
                let bytes = NODE_BYTES + text.len();
                let value = Value::Scalar {
                    text: text.into_owned(),
                    plain,
                };
                (Node { pos, value }, anchor, bytes)
            }
            Event::Alias(id) => match self.anchors.get(&id) {
                Some((node, bytes)) => {
                    let (node, bytes) = (node.clone(), *bytes);
                    self.copy(bytes, pos)?;
                    (node, 0, bytes)
                }
                None => {
                    let message = "alias to an unknown anchor";
                    return Err(SyntaxError::new(pos, message, syntax_help(message)));
                }
            },
            Event::SequenceStart(anchor, _) => {
                self.open(pos, Value::Seq(Vec::new()), anchor)?;
                return Ok(None);
            }
            Event::MappingStart(anchor, _) => {
                self.open(pos, Value::Map(Vec::new()), anchor)?;
                return Ok(None);
            }
            Event::SequenceEnd | Event::MappingEnd => match self.stack.pop() {
                Some(open) => (open.node, open.anchor, NODE_BYTES + open.bytes),
                None => return Ok(None),
            },
            Event::DocumentEnd | Event::StreamEnd => {
                return Ok(None);
            }
            _ => return Ok(None),
        };
        if anchor != 0 {
            // Counted before it is made: a copy over the budget is never made.
            self.copy(bytes, pos)?;
            self.anchors.insert(anchor, (node.clone(), bytes));
        }
        self.attach(node, bytes)
    }

    /// Counts a copy of `bytes` against the document's budget.
    fn copy(&mut self, bytes: usize, pos: Pos) -> Result<(), SyntaxError> {
        self.copied = self.copied.saturating_add(bytes);
        if self.copied > MAX_COPIED_BYTES {
            return Err(SyntaxError::new(
                pos,
                format!(
                    "anchors and aliases copy more than {} MiB",
                    MAX_COPIED_BYTES >> 20
                ),
                "write the repeated parts out instead",
            ));
        }
        Ok(())
    }

    fn open(&mut self, pos: Pos, value: Value, anchor: usize) -> Result<(), SyntaxError> {
        if self.stack.len() >= MAX_DEPTH {
            return Err(SyntaxError::new(
                pos,
                format!("lists and mappings nest deeper than {MAX_DEPTH} levels"),
                "nest them less deeply",
            ));
        }
        self.stack.push(Open {
            node: Node { pos, value },
            anchor,
            pending_key: None,
            bytes: 0,
        });
        Ok(())
    }

    /// Hands a finished node to its parent; returns it when it is the document's root.
    fn attach(&mut self, node: Node, bytes: usize) -> Result<Option<Node>, SyntaxError> {
        let Some(parent) = self.stack.last_mut() else {
            return Ok(Some(node));
        };
        parent.bytes = parent.bytes.saturating_add(bytes);
        match &mut parent.node.value {
            Value::Seq(items) => items.push(node),
            Value::Map(entries) => match parent.pending_key.take() {
                Some((key, key_pos)) => entries.push(Entry {
                    key,
                    key_pos,
                    value: node,
                }),
                None => match node.value {
                    Value::Scalar { text, .. } => parent.pending_key = Some((text, node.pos)),
                    _ => {
                        return Err(SyntaxError::new(
                            node.pos,
                            "a mapping key is a list or a mapping",
                            "write each key as a plain name",
                        ));
                    }
                },
            },
            Value::Scalar { .. } => unreachable!("only collections are ever opened"),
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_one_based_lines_and_columns() {
        let node = parse("a: 1\nb:\n  - x\n  - 'y'\n").unwrap();
        let Value::Map(entries) = &node.value else {
            panic!("not a map")
        };
        assert_eq!(entries[1].key, "b");
        assert_eq!(entries[1].key_pos, Pos { line: 2, column: 1 });
        let Value::Seq(items) = &entries[1].value.value else {
            panic!("not a seq")
        };
        assert_eq!(items[1].pos, Pos { line: 4, column: 5 });
        assert_eq!(items[1].value.kind(), "a string");
    }

    #[test]
    fn duplicate_keys_are_kept_for_the_checker_to_report() {
        let node = parse("a: 1\na: 2\n").unwrap();
        let Value::Map(entries) = &node.value else {
            panic!("not a map")
        };
        assert_eq!(entries.len(), 2);
    }

    #[test]
    fn aliases_resolve_to_the_anchored_node() {
        let node = parse("a: &x {k: v}\nb: *x\n").unwrap();
        let Value::Map(entries) = &node.value else {
            panic!("not a map")
        };
        assert_eq!(entries[0].value.value, entries[1].value.value);
    }

    /// Nine levels of ten aliases each: a billion scalars from a few hundred bytes.
    fn laughs() -> String {
        let mut src = String::from("a0: &a0 [x]\n");
        for i in 1..=9 {
            let refs = vec![format!("*a{}", i - 1); 10].join(", ");
            src.push_str(&format!("a{i}: &a{i} [{refs}]\n"));
        }
        src
    }

    #[test]
    fn copies_by_anchors_and_aliases_stop_at_the_budget() {
        let refused = |src: &str| parse(src).unwrap_err().message;
        assert!(refused(&laughs()).contains("copy more than 64 MiB"));
        // One long string aliased many times.
        let long = "x".repeat(1 << 20);
        let many = vec!["*s"; 100].join(", ");
        assert!(refused(&format!("s: &s \"{long}\"\nl: [{many}]\n")).contains("copy more than"));
        // Anchors nested in anchors copy without any alias.
        let big = vec!["x"; 200_000].join(", ");
        let mut nested = format!("[{big}]");
        for _ in 0..200 {
            nested = format!("&a [{nested}]");
        }
        assert!(refused(&format!("n: {nested}\n")).contains("copy more than"));
        // A few aliases, as configs use them, are fine.
        let node = parse("a: &x [1, 2]\nb: [*x, *x, *x]\n").unwrap();
        let Value::Map(entries) = &node.value else {
            panic!("not a map")
        };
        assert_eq!(
            entries[1].value.value,
            Value::Seq(vec![entries[0].value.clone(); 3])
        );
    }

    #[test]
    fn nesting_stops_at_its_limit() {
        // Flow collections: the parser has a limit of its own.
        let deep = format!("{}x{}", "[".repeat(300), "]".repeat(300));
        assert!(parse(&deep).is_err());
        let block: String = (0..300)
            .map(|i| format!("{}- \n", "  ".repeat(i)))
            .collect();
        let err = parse(&block).unwrap_err();
        assert!(err.message.contains("nest deeper than 256"), "{err:?}");
    }

    #[test]
    fn syntax_errors_carry_a_position() {
        let err = parse("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(err.pos.line >= 1, "{err:?}");
    }

    #[test]
    fn empty_source_is_an_empty_mapping() {
        assert_eq!(parse("").unwrap().value, Value::Map(Vec::new()));
    }

    #[test]
    fn nothing_after_the_document_is_ignored() {
        let err = parse("a: 1\n---\nb: 2\n").unwrap_err();
        assert_eq!(err.pos, Pos { line: 3, column: 1 });
        assert!(err.message.contains("a second document"), "{err:?}");
        // A syntax error after the document ends, as after a JSON body's closing brace.
        assert!(parse("{\"a\": 1} }\n").is_err());
        assert!(parse("- a\nb: 1\n").is_err());
        // Markers around one document are fine; so is an empty document after it.
        for one in [
            "---\na: 1\n",
            "a: 1\n...\n",
            "a: 1\n---\n",
            "---\na: 1\n...\n---\n",
        ] {
            assert!(parse(one).is_ok(), "{one:?}");
        }
    }

    #[test]
    fn every_syntax_error_says_how_to_fix_it() {
        for (src, fix) in [
            ("a: [1, 2\nb: 3\n", "close a `[` or `{`"),
            ("a: {x: 1\nb: 2\n", "close the mapping with `}`"),
            ("a:\n\tb: 1\n", "indent with spaces"),
            ("a: 'abc\n", "end the quoted value"),
            ("a:\n  b: 1\n c: 2\n", "indent this line"),
            ("a: b: c\n", "quote a value that holds `: `"),
            ("a: [1]]\n", "remove the extra bracket"),
            ("a: @x\n", "quote the value"),
            ("a: *x\n", "define the anchor"),
            ("a: \"b\\d+\"\n", "a backslash begins an escape"),
            ("{\"a\": 1} x\n", "remove what follows the document"),
        ] {
            let err = parse(src).unwrap_err();
            assert!(err.help.contains(fix), "{src:?}: {err:?}");
        }
    }
}
