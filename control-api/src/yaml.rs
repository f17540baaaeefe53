//! The project's one ordered YAML tree: a generic YAML value ([`Yaml`]) that keeps
//! mapping keys in document order. The control plane's store reads Istio documents
//! into it to edit route weights and write them back
//! ([`server::Store`](crate::server::Store)); `serin inject` reads Kubernetes
//! manifests into it to add the sidecar.
//!
//! Why a tree of our own: serde-saphyr deserializes straight into typed values and has
//! no value type; `serde_json::Value` would do as a tree, but without serde_json's
//! `preserve_order` feature (a workspace-wide switch) it sorts mapping keys, and an
//! edited document must still read like the one its author wrote. So documents are
//! read into this small tree through serde's `deserialize_any` and written back with
//! serde-saphyr's serializer. Comments are not kept; keys, order and values are.
//!
//! Scalars are read the way Kubernetes reads them (sigs.k8s.io/yaml, a YAML 1.1
//! reader, which also reads Istio's configs): `yes`/`no`/`on`/`off` are booleans and
//! `0644` is octal (420). Strings that a reader could take for something else are
//! quoted when written, and long strings are never folded.
//!
//! ```
//! use serin_control_api::yaml::{Yaml, parse_document, to_yaml};
//!
//! let mut doc = parse_document("kind: Pod\nspec: {replicas: 1}\n")?.unwrap_or_default();
//! if let Some(spec) = doc.get_mut("spec").and_then(Yaml::as_map_mut) {
//!     spec.insert("replicas", Yaml::Int(2));
//! }
//! assert_eq!(doc.at(&["spec", "replicas"]), Some(&Yaml::Int(2)));
//! assert_eq!(to_yaml(&doc)?, "kind: Pod\nspec:\n  replicas: 2\n");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};

/// One YAML node.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum Yaml {
    /// `null`, `~` or an empty value.
    #[default]
    Null,
    /// `true` / `false` (also YAML 1.1's `yes`, `on`, …).
    Bool(bool),
    /// A signed integer.
    Int(i64),
    /// An unsigned integer above `i64::MAX`.
    UInt(u64),
    /// A floating-point number.
    Float(f64),
    /// A string.
    String(String),
    /// A sequence.
    Seq(Vec<Yaml>),
    /// A mapping, keys in document order.
    Map(Mapping),
}

/// A mapping that keeps its keys in insertion (document) order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Mapping(Vec<(Yaml, Yaml)>);

impl Yaml {
    /// A string node.
    pub fn str(s: impl Into<String>) -> Yaml {
        Yaml::String(s.into())
    }

    /// The string, when this node is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Yaml::String(s) => Some(s),
            _ => None,
        }
    }

    /// The mapping, when this node is one.
    pub fn as_map(&self) -> Option<&Mapping> {
        match self {
            Yaml::Map(m) => Some(m),
            _ => None,
        }
    }

    /// The mapping, mutably, when this node is one.
    pub fn as_map_mut(&mut self) -> Option<&mut Mapping> {
        match self {
            Yaml::Map(m) => Some(m),
            _ => None,
        }
    }

    /// The sequence, when this node is one.
    pub fn as_seq(&self) -> Option<&[Yaml]> {
        match self {
            Yaml::Seq(s) => Some(s),
            _ => None,
        }
    }

    /// The sequence, mutably, when this node is one.
    pub fn as_seq_mut(&mut self) -> Option<&mut Vec<Yaml>> {
        match self {
            Yaml::Seq(s) => Some(s),
            _ => None,
        }
    }

    /// The integer, when this node is a non-negative one.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Yaml::Int(i) => u64::try_from(i).ok(),
            Yaml::UInt(u) => Some(u),
            _ => None,
        }
    }

    /// The value of string key `key`, when this node is a mapping that has it.
    pub fn get(&self, key: &str) -> Option<&Yaml> {
        self.as_map()?.get(key)
    }

    /// The value of string key `key`, mutably, when this node is a mapping that has it.
    pub fn get_mut(&mut self, key: &str) -> Option<&mut Yaml> {
        self.as_map_mut()?.get_mut(key)
    }

    /// The node at a path of mapping keys, e.g. `["spec", "template"]`.
    pub fn at(&self, path: &[&str]) -> Option<&Yaml> {
        path.iter().try_fold(self, |node, key| node.get(key))
    }

    /// The node at a path of mapping keys, mutably.
    pub fn at_mut(&mut self, path: &[&str]) -> Option<&mut Yaml> {
        path.iter().try_fold(self, |node, key| node.get_mut(key))
    }

    /// A short name of the node's type, for messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Yaml::Null => "null",
            Yaml::Bool(_) => "a boolean",
            Yaml::Int(_) | Yaml::UInt(_) | Yaml::Float(_) => "a number",
            Yaml::String(_) => "a string",
            Yaml::Seq(_) => "a list",
            Yaml::Map(_) => "a mapping",
        }
    }
}

/// A node found where another type was needed (see [`Mapping::map_entry`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: expected {expected}, found {found}")]
pub struct WrongType {
    /// The key that holds the node.
    pub key: String,
    /// What was needed: "a mapping" or "a list".
    pub expected: &'static str,
    /// What was found.
    pub found: &'static str,
}

impl Mapping {
    /// An empty mapping.
    pub fn new() -> Mapping {
        Mapping(Vec::new())
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the mapping has no entry.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The entries, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&Yaml, &Yaml)> {
        self.0.iter().map(|(k, v)| (k, v))
    }

    /// The value of string key `key`.
    pub fn get(&self, key: &str) -> Option<&Yaml> {
        self.0.iter().find(|(k, _)| k.as_str() == Some(key)).map(|(_, v)| v)
    }

    /// The value of string key `key`, mutably.
    pub fn get_mut(&mut self, key: &str) -> Option<&mut Yaml> {
        self.0.iter_mut().find(|(k, _)| k.as_str() == Some(key)).map(|(_, v)| v)
    }

    /// The string value of `key`, when it is a string.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(Yaml::as_str)
    }

    /// Sets `key` to `value`: in place when the key exists (its position is kept),
    /// else appended.
    pub fn insert(&mut self, key: &str, value: Yaml) {
        match self.get_mut(key) {
            Some(slot) => *slot = value,
            None => self.0.push((Yaml::str(key), value)),
        }
    }

    /// Removes `key`, returning its value.
    pub fn remove(&mut self, key: &str) -> Option<Yaml> {
        let index = self.0.iter().position(|(k, _)| k.as_str() == Some(key))?;
        Some(self.0.remove(index).1)
    }

    /// The mapping under `key`, created (appended) when the key is missing or null.
    pub fn map_entry(&mut self, key: &str) -> Result<&mut Mapping, WrongType> {
        self.entry(key, || Yaml::Map(Mapping::new()), Yaml::as_map_mut, "a mapping")
    }

    /// The list under `key`, created (appended) when the key is missing or null.
    pub fn seq_entry(&mut self, key: &str) -> Result<&mut Vec<Yaml>, WrongType> {
        self.entry(key, || Yaml::Seq(Vec::new()), Yaml::as_seq_mut, "a list")
    }

    /// The node under `key` as `pick` takes it, `empty()` put there first when the
    /// key is missing or null; a [`WrongType`] naming `expected` when `pick` refuses it.
    fn entry<T: ?Sized>(
        &mut self,
        key: &str,
        empty: fn() -> Yaml,
        pick: fn(&mut Yaml) -> Option<&mut T>,
        expected: &'static str,
    ) -> Result<&mut T, WrongType> {
        if matches!(self.get(key), None | Some(Yaml::Null)) {
            self.insert(key, empty());
        }
        let found = self.get(key).map_or("nothing", Yaml::type_name);
        self.get_mut(key).and_then(pick).ok_or_else(|| WrongType { key: key.to_string(), expected, found })
    }
}

impl FromIterator<(Yaml, Yaml)> for Mapping {
    fn from_iter<I: IntoIterator<Item = (Yaml, Yaml)>>(iter: I) -> Self {
        Mapping(iter.into_iter().collect())
    }
}

/// The options documents are read with: Kubernetes' YAML 1.1 reading of booleans
/// and octal numbers; duplicate keys are an error (as for kubectl).
pub fn read_options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        legacy_octal_numbers: true,
    }
}

/// The options documents are written with: two-space indent, list items at
/// their key's column (kubectl's style), multi-line strings as literal blocks and
/// no folding of long strings (folding is where round-trips usually go wrong).
pub fn write_options() -> serde_saphyr::SerializerOptions {
    serde_saphyr::ser_options! {
        indent_step: 2,
        compact_list_indent: true,
        folded_wrap_chars: usize::MAX / 2,
    }
}

/// Reads one YAML document (`None` when it holds only comments or nothing; a caller
/// that wants [`Yaml::Null`] then takes `unwrap_or_default()`).
pub fn parse_document(text: &str) -> Result<Option<Yaml>, serde_saphyr::Error> {
    serde_saphyr::from_str_with_options::<Option<Yaml>>(text, read_options())
}

/// Writes one node as a YAML document (no `---` marker), ending with a newline.
pub fn to_yaml(node: &Yaml) -> Result<String, serde_saphyr::SerializeError> {
    let mut out = serde_saphyr::to_string_with_options(node, write_options())?;
    if !out.ends_with('\n') {
        out.push('\n');
    }
    Ok(out)
}

impl Serialize for Yaml {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Yaml::Null => serializer.serialize_unit(),
            Yaml::Bool(b) => serializer.serialize_bool(*b),
            Yaml::Int(i) => serializer.serialize_i64(*i),
            Yaml::UInt(u) => serializer.serialize_u64(*u),
            Yaml::Float(f) => serializer.serialize_f64(*f),
            Yaml::String(s) => serializer.serialize_str(s),
            Yaml::Seq(items) => {
                let mut seq = serializer.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(item)?;
                }
                seq.end()
            }
            Yaml::Map(m) => m.serialize(serializer),
        }
    }
}

impl Serialize for Mapping {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for Yaml {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Yaml, D::Error> {
        deserializer.deserialize_any(YamlVisitor)
    }
}

struct YamlVisitor;

impl<'de> Visitor<'de> for YamlVisitor {
    type Value = Yaml;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }

    fn visit_unit<E>(self) -> Result<Yaml, E> {
        Ok(Yaml::Null)
    }

    fn visit_none<E>(self) -> Result<Yaml, E> {
        Ok(Yaml::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Yaml, D::Error> {
        Yaml::deserialize(d)
    }

    fn visit_bool<E>(self, v: bool) -> Result<Yaml, E> {
        Ok(Yaml::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Yaml, E> {
        Ok(Yaml::Int(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Yaml, E> {
        Ok(i64::try_from(v).map_or(Yaml::UInt(v), Yaml::Int))
    }

    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Yaml, E> {
        if let Ok(i) = i64::try_from(v) {
            Ok(Yaml::Int(i))
        } else if let Ok(u) = u64::try_from(v) {
            Ok(Yaml::UInt(u))
        } else {
            Err(E::custom(format!("integer {v} does not fit in 64 bits")))
        }
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Yaml, E> {
        match u64::try_from(v) {
            Ok(u) => self.visit_u64(u),
            Err(_) => Err(E::custom(format!("integer {v} does not fit in 64 bits"))),
        }
    }

    fn visit_f64<E>(self, v: f64) -> Result<Yaml, E> {
        Ok(Yaml::Float(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<Yaml, E> {
        Ok(Yaml::str(v))
    }

    fn visit_string<E>(self, v: String) -> Result<Yaml, E> {
        Ok(Yaml::String(v))
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Yaml, E> {
        match std::str::from_utf8(v) {
            Ok(s) => Ok(Yaml::str(s)),
            Err(_) => Err(E::custom("binary values are not supported")),
        }
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Yaml, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
        while let Some(item) = seq.next_element::<Yaml>()? {
            items.push(item);
        }
        Ok(Yaml::Seq(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Yaml, A::Error> {
        let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0).min(1024));
        while let Some((k, v)) = map.next_entry::<Yaml, Yaml>()? {
            entries.push((k, v));
        }
        Ok(Yaml::Map(Mapping(entries)))
    }
}

/// One `---`-separated document of a YAML stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Document<'a> {
    /// The document's text, starting with its `---` line when it has one.
    pub text: &'a str,
    /// 1-based line of `text`'s first line in the whole stream.
    pub first_line: u32,
}

impl<'a> Document<'a> {
    /// The text without its leading `---` marker line (and a comment on it).
    pub fn content(&self) -> &'a str {
        match self.text.split_once('\n') {
            Some((first, rest)) if is_marker(first) => rest,
            None if is_marker(self.text) => "",
            _ => self.text,
        }
    }
}

/// Whether `line` is a document marker: `---` at the start of the line, then
/// nothing or white space (YAML forbids such a line inside content).
fn is_marker(line: &str) -> bool {
    let body = line.trim_end_matches(['\n', '\r']);
    body.starts_with("---") && body[3..].chars().next().is_none_or(char::is_whitespace)
}

/// Splits a YAML stream at document markers. Each document keeps its own marker
/// line; an empty stream has no documents.
pub fn split_documents(text: &str) -> Vec<Document<'_>> {
    let mut docs = Vec::new();
    let (mut start, mut start_line, mut offset) = (0usize, 1u32, 0usize);
    for (index, line) in text.split_inclusive('\n').enumerate() {
        let marker = is_marker(line);
        if marker && offset > start {
            docs.push(Document { text: &text[start..offset], first_line: start_line });
            start = offset;
        }
        if marker {
            start_line = u32::try_from(index + 1).unwrap_or(u32::MAX);
        }
        offset += line.len();
    }
    if offset > start {
        docs.push(Document { text: &text[start..], first_line: start_line });
    }
    docs
}

#[cfg(test)]
mod tests {
    #[test]
    fn documents_split_at_markers_only() {
        let text = "a: 1\n---\nb: |\n  ---not a marker\n--- # c\nc: 3\n---\n";
        let parts: Vec<_> = split_documents(text).iter().map(|d| (d.text, d.first_line)).collect();
        assert_eq!(parts, [("a: 1\n", 1), ("---\nb: |\n  ---not a marker\n", 2), ("--- # c\nc: 3\n", 5), ("---\n", 7)]);
        let contents: Vec<_> = split_documents(text).iter().map(|d| d.content()).collect();
        assert_eq!(contents, ["a: 1\n", "b: |\n  ---not a marker\n", "c: 3\n", ""]);
        assert!(split_documents("").is_empty());
        assert_eq!(split_documents("x: '---'\ny: ----\n").len(), 1);
    }

    use super::*;

    fn parse(text: &str) -> Yaml {
        parse_document(text).expect("parses").expect("not empty")
    }

    #[test]
    fn keys_keep_their_document_order() {
        let doc = parse("zeta: 1\nalpha: 2\nmid: {z: 1, a: 2}\n");
        let Yaml::Map(m) = &doc else { panic!("not a map: {doc:?}") };
        let keys: Vec<_> = m.iter().map(|(k, _)| k.as_str().unwrap_or("?")).collect();
        assert_eq!(keys, ["zeta", "alpha", "mid"]);
        assert_eq!(to_yaml(&doc).unwrap(), "zeta: 1\nalpha: 2\nmid:\n  z: 1\n  a: 2\n");
    }

    #[test]
    fn scalars_are_read_as_kubernetes_reads_them() {
        let doc = parse(
            "octal: 0644\nyes: yes\noff: off\nquoted: \"0644\"\nfloat: 1.10\nnull1: ~\nnull2:\nbig: 18446744073709551615\n",
        );
        let m = doc.as_map().unwrap();
        assert_eq!(m.get("octal"), Some(&Yaml::Int(420)));
        assert_eq!(m.get("quoted"), Some(&Yaml::str("0644")));
        assert_eq!(m.get("float"), Some(&Yaml::Float(1.1)));
        assert_eq!(m.get("null1"), Some(&Yaml::Null));
        assert_eq!(m.get("null2"), Some(&Yaml::Null));
        assert_eq!(m.get("big"), Some(&Yaml::UInt(u64::MAX)));
        // `yes` and `off` as values are YAML 1.1 booleans, as kubectl reads them.
        let bools: Vec<_> = m.iter().filter(|(_, v)| matches!(v, Yaml::Bool(_))).map(|(_, v)| v.clone()).collect();
        assert_eq!(bools, [Yaml::Bool(true), Yaml::Bool(false)]);
    }

    #[test]
    fn ambiguous_strings_survive_a_round_trip() {
        let tricky = [
            "yes",
            "no",
            "on",
            "off",
            "y",
            "n",
            "true",
            "False",
            "null",
            "~",
            "",
            "0644",
            "0x1F",
            "1e3",
            "1_000",
            "12:30",
            "*",
            "&a",
            "!tag",
            "- item",
            "a: b",
            "#hash",
            "'single'",
            "\"double\"",
            "line1\nline2\n",
            "trailing ",
            " leading",
            "{\"json\":[1,2]}",
            "15090",
            "1.0",
            ".inf",
            "@at",
            "`tick",
            "%pct",
            "a  double  space",
            "tab\there",
            "ümlaut",
        ];
        let long = "x".repeat(200);
        let long_words = "word ".repeat(40);
        for s in tricky.into_iter().chain([long.as_str(), long_words.as_str()]) {
            let node = Yaml::Map([(Yaml::str("k"), Yaml::str(s))].into_iter().collect());
            let text = to_yaml(&node).unwrap();
            assert_eq!(parse(&text), node, "string {s:?} written as {text:?}");
        }
    }

    #[test]
    fn numbers_booleans_and_nested_values_survive_a_round_trip() {
        let text = "a: 1\nb: -7\nc: 0.5\nd: true\ne: null\nf: []\ng: {}\nh:\n- 1\n- x: [1, two]\n  y: {}\nbig: 18446744073709551615\n";
        let doc = parse(text);
        assert_eq!(parse(&to_yaml(&doc).unwrap()), doc);
    }

    #[test]
    fn multi_line_strings_are_written_as_literal_blocks() {
        let node = Yaml::Map([(Yaml::str("script"), Yaml::str("echo one\necho two\n"))].into_iter().collect());
        let text = to_yaml(&node).unwrap();
        assert!(text.starts_with("script: |"), "{text}");
    }

    #[test]
    fn entries_are_created_in_place_and_wrong_types_are_named() {
        let mut doc = parse("metadata:\n  name: x\nspec: 3\n");
        let m = doc.as_map_mut().unwrap();
        m.map_entry("metadata").unwrap().map_entry("annotations").unwrap().insert("a", Yaml::str("b"));
        let annotation = m.get("metadata").and_then(|v| v.at(&["annotations", "a"])).and_then(Yaml::as_str);
        assert_eq!(annotation, Some("b"));
        let err = m.seq_entry("spec").unwrap_err();
        assert_eq!(err, WrongType { key: "spec".into(), expected: "a list", found: "a number" });
        m.insert("metadata", Yaml::Null);
        let keys: Vec<_> = m.iter().map(|(k, _)| k.as_str().unwrap_or("?")).collect();
        assert_eq!(keys, ["metadata", "spec"], "insert keeps the key's position");
    }

    #[test]
    fn an_istio_document_round_trips_with_its_order_and_types() {
        let text = "kind: VirtualService\nmetadata:\n  name: payment\n  labels:\n    serin.io/stable: \"true\"\n    port: \"8080\"\nspec:\n  hosts: [payment]\n  http:\n  - route:\n    - destination: {host: payment, subset: v1}\n      weight: 95\n    timeout: 1.5\n    empty: ~\n";
        let doc = parse(text);
        assert_eq!(doc.at(&["metadata", "labels", "serin.io/stable"]).and_then(Yaml::as_str), Some("true"));
        let out = to_yaml(&doc).unwrap();
        let again = parse(&out);
        assert_eq!(doc, again, "{out}");
        let keys: Vec<_> = again.as_map().unwrap().iter().filter_map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["kind", "metadata", "spec"]);
    }

    #[test]
    fn nodes_are_reached_and_edited_through_paths() {
        let mut doc = parse("spec:\n  http:\n  - route:\n    - weight: 95\n    - weight: -1\nname: x\n");
        let routes = doc.at_mut(&["spec", "http"]).and_then(Yaml::as_seq_mut).unwrap();
        let destinations = routes[0].get_mut("route").and_then(Yaml::as_seq_mut).unwrap();
        assert_eq!(destinations[0].get("weight").and_then(Yaml::as_u64), Some(95));
        assert_eq!(destinations[1].get("weight").and_then(Yaml::as_u64), None, "negative");
        destinations[0].as_map_mut().unwrap().insert("weight", Yaml::Int(5));
        assert_eq!(
            doc.at(&["spec", "http"]).and_then(Yaml::as_seq).unwrap()[0].at(&["route"]).unwrap().as_seq().unwrap()[0]
                .get("weight"),
            Some(&Yaml::Int(5))
        );
        assert_eq!(doc.at(&["name", "deeper"]), None, "a path through a string");
        assert_eq!(doc.get_mut("missing"), None);
        assert_eq!(Yaml::UInt(u64::MAX).as_u64(), Some(u64::MAX));
    }

    #[test]
    fn empty_documents_read_as_none() {
        assert_eq!(parse_document("").unwrap(), None);
        assert_eq!(parse_document("# only a comment\n").unwrap(), None);
        assert_eq!(parse_document("~\n").unwrap().unwrap_or_default(), Yaml::Null);
    }
}
