//! The one place minilet parses YAML: static pod manifests, the agent's
//! config file, and the YAML in tests all go through here.
//!
//! The parser is serde-saphyr (pure safe Rust, panic-free), because every
//! input here may be hostile or broken and it lets us bound the work a
//! document can cause. Each document is held to [`Limits`]: alias
//! expansion is charged like the text it stands for, so a small file that
//! expands to hundreds of MiB (an alias "billion laughs" bomb) is rejected
//! with one [`Error`] after a bounded amount of work and memory, instead of
//! being decoded.
//!
//! Multi-document text is parsed once, front to back ([`documents`]): the
//! cost of a file is linear in its size.
//!
//! Side effects: none (pure parsing).

use std::fmt;

use serde::de::{self, DeserializeOwned, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};

/// The bounds on one YAML document. The node and byte bounds count what a
/// document expands to (aliases replayed), not only the text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Nodes (scalars, sequences, mappings) in one document.
    pub max_nodes: usize,
    /// Bytes of scalar text in one document.
    pub max_scalar_bytes: usize,
    /// Events replayed from aliases over the whole text.
    pub max_alias_events: usize,
    /// Nesting of sequences and mappings.
    pub max_depth: usize,
}

impl Limits {
    /// For one Kubernetes object (a pod, the agent config). The API server
    /// stores objects in etcd, whose default request limit is 1.5 MiB: no
    /// pod it accepts has more text than that. 50,000 nodes leave room for a
    /// pod with a thousand small containers. A pod spec nests about a dozen
    /// levels deep.
    pub const OBJECT: Limits = Limits {
        max_nodes: 50_000,
        max_scalar_bytes: 1536 * 1024,
        max_alias_events: 100_000,
        max_depth: 64,
    };

    fn options(self) -> serde_saphyr::Options {
        let mut budget = serde_saphyr::Budget::default();
        budget.max_nodes = self.max_nodes;
        budget.max_events = self.max_nodes.saturating_mul(2).saturating_add(16);
        budget.max_total_scalar_bytes = self.max_scalar_bytes;
        budget.max_depth = self.max_depth;
        budget.max_aliases = self.max_alias_events;
        budget.max_anchors = self.max_nodes;
        budget.max_recorded_anchor_events = self.max_alias_events;
        budget.max_recorded_anchor_bytes = self.max_scalar_bytes;
        // The text is already in memory, and bounded by its reader.
        budget.max_reader_input_bytes = None;
        let mut options = serde_saphyr::Options::default();
        options.budget = Some(budget);
        options.alias_limits.max_total_replayed_events = self.max_alias_events;
        // Kubernetes reads manifests as YAML 1.1 (go-yaml): `0644` is octal,
        // as in a volume's defaultMode.
        options.legacy_octal_numbers = true;
        // One line per error: the position is in `location`.
        options.with_snippet = false;
        options
    }
}

/// Why a YAML text was not decoded: syntax, a type mismatch, or a
/// [`Limits`] bound. Shown as one line, the position at its end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    message: String,
    location: Option<(u64, u64)>,
    over_limit: bool,
}

impl Error {
    fn new(e: &serde_saphyr::Error) -> Error {
        let text = e
            .render_with_formatter(&serde_saphyr::UserMessageFormatter)
            .replace('\n', " ");
        // A message wrapped by `Traced` carries its position only as text.
        let (message, written) = split_location(&text);
        let location = e
            .location()
            .filter(|l| l.line() > 0)
            .map(|l| (l.line(), l.column()))
            .or(written);
        let over_limit = OVER_LIMIT_MESSAGES.iter().any(|m| message.contains(m));
        Error {
            message,
            location,
            over_limit,
        }
    }

    /// What is wrong, without the position.
    pub fn reason(&self) -> &str {
        &self.message
    }

    /// 1-based line and column, when known.
    pub fn location(&self) -> Option<(u64, u64)> {
        self.location
    }

    /// Whether a [`Limits`] bound stopped the parse (rather than a fault in
    /// the text).
    pub fn is_over_limit(&self) -> bool {
        self.over_limit
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if let Some((line, column)) = self.location {
            write!(f, " at line {line} column {column}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {}

/// Takes the first " at line L, column C" (or "line L column C") out of a
/// message, keeping what follows it (serde-saphyr adds where an alias was
/// defined and used).
fn split_location(text: &str) -> (String, Option<(u64, u64)>) {
    let parsed = text.find(" at line ").and_then(|at| {
        let rest = &text[at + " at line ".len()..];
        let (line, rest) = rest.split_once(' ')?;
        let rest = rest.strip_prefix("column ")?;
        let end = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let line = line.trim_end_matches(',').parse().ok()?;
        let column = rest[..end].parse().ok()?;
        Some((format!("{}{}", &text[..at], &rest[end..]), (line, column)))
    });
    match parsed {
        Some((message, loc)) => (message, Some(loc)),
        None => (text.to_string(), None),
    }
}

/// The start of serde-saphyr's messages for a breached budget or alias
/// limit (read from its message formatter); `Traced` keeps them only as
/// text.
const OVER_LIMIT_MESSAGES: &[&str] = &[
    "budget breached",
    "alias replay limit exceeded",
    "alias expansion limit exceeded",
    "alias replay stack depth exceeded",
    "alias replay counter overflow",
];

/// Decodes a text holding one document, within [`Limits::OBJECT`].
pub fn from_str<T: DeserializeOwned>(text: &str) -> Result<T, Error> {
    from_str_within(text, Limits::OBJECT)
}

/// Decodes a text holding one document, within `limits`.
pub fn from_str_within<T: DeserializeOwned>(text: &str, limits: Limits) -> Result<T, Error> {
    serde_saphyr::from_str_with_options::<Traced<T>>(text, limits.options())
        .map(|t| t.0)
        .map_err(|e| Error::new(&e))
}

/// Decodes every non-empty document of `text` (empty ones, such as a
/// leading `---` or one of only comments, are skipped), in one pass, each
/// within `limits`. A document of the wrong shape gives an `Err` in its
/// place and the next ones are still decoded; after a syntax error or a
/// bound the text cannot be followed, so that `Err` is the last item.
/// Reading stops after `max + 1` items, so a caller that finds more than
/// `max` knows the text has too many documents without holding them all.
pub fn documents<T: DeserializeOwned>(
    text: &str,
    limits: Limits,
    max: usize,
) -> Vec<Result<T, Error>> {
    let mut reader = text.as_bytes();
    serde_saphyr::read_with_options::<_, Traced<T>>(&mut reader, limits.options())
        .map(|r| r.map(|t| t.0).map_err(|e| Error::new(&e)))
        .take(max.saturating_add(1))
        .collect()
}

/// A document's top level, without decoding what is below it: a mapping's
/// entries in order, or not a mapping. `V` chooses how much of each key
/// and value is kept ([`Text`] keeps only strings).
#[derive(Debug, Clone, PartialEq)]
pub enum Document<V> {
    Mapping(Vec<(V, V)>),
    NotAMapping,
}

impl<V> Document<V> {
    /// The entries, when a mapping.
    pub fn entries(&self) -> Option<&[(V, V)]> {
        match self {
            Document::Mapping(entries) => Some(entries),
            Document::NotAMapping => None,
        }
    }
}

impl Document<Text> {
    /// The string value of the top-level `key`, if it is one.
    pub fn field(&self, key: &str) -> Option<&str> {
        self.entries()?
            .iter()
            .find(|(k, _)| k.0.as_deref() == Some(key))
            .and_then(|(_, v)| v.0.as_deref())
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for Document<V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct DocVisitor<V>(std::marker::PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for DocVisitor<V> {
            type Value = Document<V>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a YAML document")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    entries.push(entry);
                }
                Ok(Document::Mapping(entries))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Document::NotAMapping)
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
                Ok(Document::NotAMapping)
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
                Ok(Document::NotAMapping)
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
                Ok(Document::NotAMapping)
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
                Ok(Document::NotAMapping)
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
                Ok(Document::NotAMapping)
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Document::NotAMapping)
            }
        }
        d.deserialize_any(DocVisitor(std::marker::PhantomData))
    }
}

/// A scalar's text when it is a string, else `None`; what is below a
/// collection is not kept, only the length of its longest list (a bound
/// that can be checked before a document is decoded into types whose
/// items are large: an empty `{}` costs 3 bytes of text and a container
/// 2 KiB of memory).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Text(pub Option<String>, pub usize);

impl Text {
    /// Items in the longest list at or below this value.
    pub fn longest_list(&self) -> usize {
        self.1
    }
}

impl Document<Text> {
    /// Items in the longest list anywhere in the document.
    pub fn longest_list(&self) -> usize {
        self.entries()
            .into_iter()
            .flatten()
            .map(|(k, v)| k.1.max(v.1))
            .max()
            .unwrap_or(0)
    }
}

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct TextVisitor;
        impl<'de> Visitor<'de> for TextVisitor {
            type Value = Text;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any YAML value")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Text, E> {
                Ok(Text(Some(s.to_string()), 0))
            }
            fn visit_string<E: de::Error>(self, s: String) -> Result<Text, E> {
                Ok(Text(Some(s), 0))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Text, E> {
                Ok(Text::default())
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Text, E> {
                Ok(Text::default())
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Text, E> {
                Ok(Text::default())
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Text, E> {
                Ok(Text::default())
            }
            fn visit_unit<E: de::Error>(self) -> Result<Text, E> {
                Ok(Text::default())
            }
            fn visit_none<E: de::Error>(self) -> Result<Text, E> {
                Ok(Text::default())
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Text, A::Error> {
                let (mut items, mut longest) = (0, 0);
                while let Some(item) = seq.next_element::<Text>()? {
                    items += 1;
                    longest = longest.max(item.1);
                }
                Ok(Text(None, longest.max(items)))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Text, A::Error> {
                let mut longest = 0;
                while let Some((k, v)) = map.next_entry::<Text, Text>()? {
                    longest = longest.max(k.1).max(v.1);
                }
                Ok(Text(None, longest))
            }
        }
        d.deserialize_any(TextVisitor)
    }
}

/// `T`, decoded with the path of the field at fault added to the error
/// (`spec.containers[0].image: ...`), as the API server names fields.
struct Traced<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Traced<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[cfg(test)]
        tests::DECODED.with(|n| n.set(n.get() + 1));
        serde_path_to_error::deserialize(d)
            .map(Traced)
            .map_err(|e| {
                let path = e.path().to_string();
                let inner = e.into_inner();
                if path == "." || path == "?" {
                    inner
                } else {
                    de::Error::custom(format!("{path}: {inner}"))
                }
            })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Pod;
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;
    use std::time::{Duration, Instant};

    thread_local! {
        /// Documents decoded (`Traced` entered) on this thread.
        pub(crate) static DECODED: Cell<usize> = const { Cell::new(0) };
        static TRACKING: Cell<bool> = const { Cell::new(false) };
        static LIVE: Cell<isize> = const { Cell::new(0) };
        static PEAK: Cell<isize> = const { Cell::new(0) };
    }

    /// Counts the bytes this thread holds while `peak_bytes` tracks it, so
    /// a test can bound the memory a parse takes (other tests' threads are
    /// not counted).
    struct Counting;

    // The allocator only adds bookkeeping on thread-local cells (const
    // initialised, no destructor, so no allocation or re-entry) around
    // `System`.
    #[allow(unsafe_code)]
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            account(layout.size() as isize);
            // SAFETY: forwarded unchanged to the system allocator.
            unsafe { System.alloc(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            account(-(layout.size() as isize));
            // SAFETY: `ptr` came from `System.alloc` with this layout.
            unsafe { System.dealloc(ptr, layout) }
        }
    }

    fn account(delta: isize) {
        let _ = TRACKING.try_with(|t| {
            if t.get() {
                let live = LIVE.get() + delta;
                LIVE.set(live);
                PEAK.set(PEAK.get().max(live));
            }
        });
    }

    #[global_allocator]
    static ALLOCATOR: Counting = Counting;

    /// Runs `f` and returns its result and the most bytes this thread held
    /// at once while it ran.
    fn peak_bytes<R>(f: impl FnOnce() -> R) -> (R, usize) {
        LIVE.set(0);
        PEAK.set(0);
        TRACKING.set(true);
        let r = f();
        TRACKING.set(false);
        (r, PEAK.get().max(0) as usize)
    }

    const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\nspec:\n  containers:\n  - name: main\n    image: busybox\n";

    /// "Billion laughs": ten levels of ten aliases each, under a field Pod
    /// ignores; a few hundred bytes of text for 10^10 strings.
    fn laughs() -> String {
        let mut s = format!("{POD}x-lol:\n  l0: &l0 lol\n");
        for i in 1..10 {
            let refs = vec![format!("*l{}", i - 1); 10].join(", ");
            s.push_str(&format!("  l{i}: &l{i} [{refs}]\n"));
        }
        s
    }

    /// One 1 MiB string named by 2,000 aliases: 2 GiB once decoded.
    fn wide_bomb() -> String {
        let refs = vec!["*s"; 2000].join(", ");
        format!(
            "{POD}    args: [&s \"{}\", {refs}]\n",
            "x".repeat(1024 * 1024)
        )
    }

    #[test]
    fn alias_bombs_stop_with_one_error_in_bounded_time_and_memory() {
        for (name, text) in [("laughs", laughs()), ("wide", wide_bomb())] {
            let start = Instant::now();
            let (result, peak) = peak_bytes(|| from_str::<Pod>(&text));
            let err = result.expect_err(name);
            assert!(err.is_over_limit(), "{name}: {err}");
            assert!(!err.to_string().contains('\n'), "{name}: {err}");
            // Wall time on a loaded machine; the expansion would take minutes.
            assert!(start.elapsed() < Duration::from_secs(30), "{name}");
            // The text itself is at most 1 MiB; decoding adds little.
            assert!(peak < 16 * 1024 * 1024, "{name}: {peak} bytes held");
            // The streaming reader stops at the same bound.
            let docs = documents::<Pod>(&text, Limits::OBJECT, usize::MAX);
            assert!(matches!(&docs[..], [Err(e)] if e.is_over_limit()), "{name}");
        }
    }

    #[test]
    fn leading_zero_numbers_are_octal_as_kubernetes_reads_them() {
        let text = format!(
            "{POD}  volumes: [{{name: s, secret: {{secretName: s, defaultMode: 0644}}}}]\n"
        );
        let pod: Pod = from_str(&text).unwrap();
        let volumes = pod.spec.unwrap().volumes.unwrap();
        assert_eq!(
            volumes[0].secret.as_ref().unwrap().default_mode,
            Some(0o644)
        );
    }

    #[test]
    fn anchors_within_the_bounds_still_work() {
        let text = format!(
            "{POD}    env: &env [{{name: A, value: a}}]\n  - name: side\n    image: busybox\n    env: *env\n"
        );
        let pod: Pod = from_str(&text).unwrap();
        let spec = pod.spec.unwrap();
        assert_eq!(spec.containers[1].env, spec.containers[0].env);
    }

    #[test]
    fn a_pod_with_a_thousand_containers_is_within_the_bounds() {
        let mut text =
            "apiVersion: v1\nkind: Pod\nmetadata: {name: big}\nspec:\n  containers:\n".to_string();
        for i in 0..1000 {
            text.push_str(&format!(
                "  - name: c{i}\n    image: busybox\n    command: [sleep, \"3600\"]\n    ports: [{{containerPort: 80}}]\n"
            ));
        }
        let pod: Pod = from_str(&text).unwrap();
        assert_eq!(pod.spec.unwrap().containers.len(), 1000);
    }

    #[test]
    fn too_many_nodes_even_without_aliases_is_over_the_limit() {
        // Empty containers are the most memory per node of text.
        let flood = format!(
            "apiVersion: v1\nkind: Pod\nspec:\n  containers: [{}]\n",
            vec!["{}"; 60_000].join(",")
        );
        for text in [
            format!("{POD}    args: [{}]\n", vec!["a"; 60_000].join(",")),
            flood.clone(),
        ] {
            let err = from_str::<Document<Text>>(&text).unwrap_err();
            assert!(err.is_over_limit(), "{err}");
        }
        // Within the node bound, a list's length is known before its items
        // are decoded into containers (2 KiB each).
        let flood = flood.replacen(&"{},".repeat(20_000), "", 1);
        let (head, peak) = peak_bytes(|| from_str::<Document<Text>>(&flood).unwrap());
        assert_eq!(head.longest_list(), 40_000);
        assert!(peak < 4 * 1024 * 1024, "{peak} bytes held");
    }

    #[test]
    fn errors_name_the_field_and_the_position_on_one_line() {
        let text = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\nspec:\n  containers:\n  - name: main\n    ports:\n    - containerPort: eighty\n";
        let err = from_str::<Pod>(text).unwrap_err();
        assert_eq!(
            err.to_string(),
            "spec.containers[0].ports[0].containerPort: invalid i32 at line 9 column 22"
        );
        assert_eq!(err.location(), Some((9, 22)));
        assert!(!err.is_over_limit());
        let err = from_str::<Pod>("a: 1\na: 2\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "duplicate mapping key `a` is not allowed here at line 2 column 1"
        );
        let err = from_str::<Pod>("a: [b\n").unwrap_err();
        assert!(err.location().is_some(), "{err}");
    }

    #[test]
    fn documents_are_decoded_once_each_and_empty_ones_skipped() {
        let text = "---\n# only a comment\n---\na: b\n---\n- x\n---\nk: v\n";
        let before = DECODED.get();
        let docs = documents::<Document<Text>>(text, Limits::OBJECT, usize::MAX);
        assert_eq!(DECODED.get() - before, 3);
        let docs: Vec<_> = docs.into_iter().map(Result::unwrap).collect();
        assert_eq!(docs[0].field("a"), Some("b"));
        assert_eq!(docs[0].longest_list(), 0);
        assert_eq!(docs[1], Document::NotAMapping);
        assert_eq!(docs[2].field("k"), Some("v"));
        // A bad shape is reported in place, later documents still come.
        let docs = documents::<Pod>("metadata: 3\n---\nmetadata: {name: b}\n", Limits::OBJECT, 2);
        assert!(docs[0].is_err());
        assert_eq!(
            docs[1].as_ref().unwrap().metadata.name.as_deref(),
            Some("b")
        );
        // Reading stops one past the most wanted.
        let three = "a: 1\n---\na: 2\n---\na: 3\n";
        assert_eq!(
            documents::<Document<Text>>(three, Limits::OBJECT, 1).len(),
            2
        );
        // After a syntax error nothing more can be read.
        let docs = documents::<Pod>("metadata: [\n---\nmetadata: {}\n", Limits::OBJECT, 2);
        assert_eq!(docs.len(), 1);
        assert!(docs[0].is_err());
    }
}
