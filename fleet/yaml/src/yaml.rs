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

impl Node {
    /// How many nodes this one holds, itself included.
    pub fn count(&self) -> usize {
        1 + match &self.value {
            Value::Scalar { .. } => 0,
            Value::Seq(items) => items.iter().map(Node::count).sum(),
            Value::Map(entries) => entries.iter().map(|e| e.value.count()).sum(),
        }
    }
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
}

impl Value {
    /// What a user would call this kind of value, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Value::Scalar { plain: false, .. } => "a string",
            Value::Scalar { text, .. } => match text.as_str() {
                "" | "~" | "null" | "Null" | "NULL" => "null",
                "true" | "false" | "True" | "False" | "TRUE" | "FALSE" => "a boolean",
                t if t.parse::<f64>().is_ok() => "a number",
                _ => "a string",
            },
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }
}

/// Parses the first document of `src`. An empty source is an empty mapping, so that the
/// checker reports the missing fields rather than a syntax error.
pub fn parse(src: &str) -> Result<Node, SyntaxError> {
    let mut builder = Builder::default();
    for item in Parser::new_from_str(src) {
        let (event, span) = item.map_err(|e| SyntaxError {
            pos: Pos {
                line: e.marker().line(),
                column: e.marker().col() + 1,
            },
            message: e.info().to_string(),
        })?;
        if let Some(root) = builder.push(event, span)? {
            return Ok(root);
        }
    }
    Ok(Node {
        pos: Pos { line: 1, column: 1 },
        value: Value::Map(Vec::new()),
    })
}

/// At most this many nodes may come from aliases in one document. Each alias is a copy of
/// its anchor's node, so a few lines of aliases of aliases would otherwise build billions
/// ("billion laughs"), from a config file or a `PUT /routes` body alike.
pub const MAX_ALIASED_NODES: usize = 1_000_000;

/// Turns the event stream into nodes: a stack of open collections, each with the key that
/// waits for its value when it is a mapping.
#[derive(Default)]
struct Builder {
    stack: Vec<Open>,
    /// Each anchor's node, with how many nodes it holds.
    anchors: Vec<(usize, Node, usize)>,
    /// Nodes copied from anchors so far.
    aliased: usize,
}

struct Open {
    node: Node,
    anchor: usize,
    pending_key: Option<(String, Pos)>,
}

impl Builder {
    fn push(&mut self, event: Event<'_>, span: Span) -> Result<Option<Node>, SyntaxError> {
        let pos = Pos::from_span(span);
        let (node, anchor) = match event {
            Event::Scalar(text, style, anchor, _tag) => {
                let plain = matches!(style, ScalarStyle::Plain);
                let value = Value::Scalar {
                    text: text.into_owned(),
                    plain,
                };
                (Node { pos, value }, anchor)
            }
            Event::Alias(id) => match self.anchors.iter().rev().find(|(a, ..)| *a == id) {
                Some((_, node, size)) => {
                    self.aliased += size;
                    if self.aliased > MAX_ALIASED_NODES {
                        return Err(SyntaxError {
                            pos,
                            message: format!(
                                "aliases expand to more than {MAX_ALIASED_NODES} nodes; write the repeated parts out instead"
                            ),
                        });
                    }
                    (node.clone(), 0)
                }
                None => {
                    return Err(SyntaxError {
                        pos,
                        message: "alias to an unknown anchor".into(),
                    });
                }
            },
            Event::SequenceStart(anchor, _) => {
                self.open(pos, Value::Seq(Vec::new()), anchor);
                return Ok(None);
            }
            Event::MappingStart(anchor, _) => {
                self.open(pos, Value::Map(Vec::new()), anchor);
                return Ok(None);
            }
            Event::SequenceEnd | Event::MappingEnd => match self.stack.pop() {
                Some(open) => (open.node, open.anchor),
                None => return Ok(None),
            },
            Event::DocumentEnd | Event::StreamEnd => {
                return Ok(None);
            }
            _ => return Ok(None),
        };
        if anchor != 0 {
            self.anchors.push((anchor, node.clone(), node.count()));
        }
        self.attach(node)
    }

    fn open(&mut self, pos: Pos, value: Value, anchor: usize) {
        self.stack.push(Open {
            node: Node { pos, value },
            anchor,
            pending_key: None,
        });
    }

    /// Hands a finished node to its parent; returns it when it is the document's root.
    fn attach(&mut self, node: Node) -> Result<Option<Node>, SyntaxError> {
        let Some(parent) = self.stack.last_mut() else {
            return Ok(Some(node));
        };
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
                        return Err(SyntaxError {
                            pos: node.pos,
                            message: "mapping keys must be plain names, not lists or mappings"
                                .into(),
                        });
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

    #[test]
    fn aliases_of_aliases_stop_at_a_million_nodes() {
        // Nine levels of ten aliases each: a billion scalars from a few hundred bytes.
        let mut src = String::from("a0: &a0 [x]\n");
        for i in 1..=9 {
            let refs = vec![format!("*a{}", i - 1); 10].join(", ");
            src.push_str(&format!("a{i}: &a{i} [{refs}]\n"));
        }
        let err = parse(&src).unwrap_err();
        assert!(err.message.contains("more than 1000000 nodes"), "{err:?}");
        // A few aliases, as configs use them, are fine.
        let node = parse("a: &x [1, 2]\nb: [*x, *x, *x]\n").unwrap();
        assert_eq!(node.count(), 14);
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
}
