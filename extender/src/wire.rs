//! The kube-scheduler extender v1 JSON types (`k8s.io/kube-scheduler/extender/v1`).
//!
//! No Rust crate provides these types, so they are written here by hand from the Go
//! definitions. The Go structs carry no JSON tags: keys are the Go field names (`Pod`, `Nodes`,
//! `NodeNames`, `FailedNodes`, `FailedAndUnresolvableNodes`, `Error`, `Host`, `Score`,
//! `PodName`, `PodNamespace`, `PodUID`, `Node`). Go's decoder matches keys ignoring case, so
//! ours does too; we always write the Go spelling.
//!
//! Node objects in `Nodes` mode are kept as the exact JSON the scheduler sent
//! ([`RawNode`]): only `metadata.name` is read, and nodes that pass are echoed back untouched.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::ser::{SerializeMap, SerializeSeq, SerializeStruct};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;

/// The body of the filter, prioritize and (legacy) predicates verbs. Node names and node
/// objects borrow from the request body where they can (5,000 names are 5,000 allocations
/// otherwise).
#[derive(Debug, Default)]
pub struct ExtenderArgs<'a> {
    /// The pod being scheduled.
    pub pod: Option<Pod>,
    /// Candidate nodes as full objects (`nodeCacheCapable: false`).
    pub nodes: Option<NodeList<'a>>,
    /// Candidate node names (`nodeCacheCapable: true`).
    pub node_names: Option<Vec<Cow<'a, str>>>,
    /// The `NodeNames` array exactly as received, when parsed from a body: a list repeated
    /// request after request is recognised by comparing these bytes.
    pub node_names_json: Option<&'a RawValue>,
}

impl ExtenderArgs<'_> {
    /// The candidate node names in request order, from whichever mode the scheduler used.
    pub fn candidate_names(&self) -> Vec<&str> {
        match (&self.node_names, &self.nodes) {
            (Some(names), _) => names.iter().map(|n| &**n).collect(),
            (None, Some(list)) => list.items.iter().map(|n| n.name.as_str()).collect(),
            (None, None) => Vec::new(),
        }
    }

    /// Which mode the request used.
    pub fn mode(&self) -> Mode {
        if self.node_names.is_some() {
            Mode::NodeNames
        } else {
            Mode::Nodes
        }
    }
}

/// How the scheduler passed the candidate nodes, and so how the answer must name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Full node objects (`nodeCacheCapable: false`).
    Nodes,
    /// Node names only (`nodeCacheCapable: true`).
    NodeNames,
}

/// A `v1.NodeList` whose items are kept verbatim.
#[derive(Debug, Default)]
pub struct NodeList<'a> {
    pub items: Vec<RawNode<'a>>,
}

/// One node object exactly as received, with its name.
#[derive(Debug)]
pub struct RawNode<'a> {
    pub name: String,
    pub raw: &'a RawValue,
}

/// kube-scheduler's `ExtenderBindingArgs`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ExtenderBindingArgs {
    pub pod_name: String,
    pub pod_namespace: String,
    pub pod_uid: String,
    pub node: String,
}

/// kube-scheduler's `ExtenderBindingResult`.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct ExtenderBindingResult {
    #[serde(rename = "Error")]
    pub error: String,
}

/// One entry of kube-scheduler's `HostPriorityList`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostPriority<'a> {
    #[serde(rename = "Host")]
    pub host: &'a str,
    #[serde(rename = "Score")]
    pub score: i64,
}

/// kube-scheduler's `ExtenderFilterResult`, borrowing the request's nodes.
#[derive(Debug, Default)]
pub struct ExtenderFilterResult<'a> {
    /// Passing nodes in `Nodes` mode.
    pub nodes: Option<Vec<&'a RawValue>>,
    /// Passing node names in `NodeNames` mode.
    pub node_names: Option<Vec<&'a str>>,
    /// Nodes that do not fit now, with the reason.
    pub failed_nodes: Vec<(&'a str, Arc<str>)>,
    /// Nodes where preemption cannot help, with the reason.
    pub failed_and_unresolvable: Vec<(&'a str, Arc<str>)>,
    pub error: String,
}

impl<'a> ExtenderFilterResult<'a> {
    /// An answer that only carries an error.
    pub fn error(message: impl Into<String>) -> Self {
        Self {
            error: message.into(),
            ..Default::default()
        }
    }

    /// Every candidate passes unchanged (a pod that is not ours).
    pub fn passthrough(args: &'a ExtenderArgs<'_>) -> Self {
        match (&args.node_names, &args.nodes) {
            (Some(names), _) => Self {
                node_names: Some(names.iter().map(|n| &**n).collect()),
                ..Default::default()
            },
            (None, Some(list)) => Self {
                nodes: Some(list.items.iter().map(|n| n.raw).collect()),
                ..Default::default()
            },
            (None, None) => Self {
                nodes: Some(Vec::new()),
                ..Default::default()
            },
        }
    }
}

struct RawItems<'b, 'a>(&'b [&'a RawValue]);

impl Serialize for RawItems<'_, '_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.0.len()))?;
        for n in self.0 {
            seq.serialize_element(n)?;
        }
        seq.end()
    }
}

struct NodeListOut<'b, 'a>(&'b [&'a RawValue]);

impl Serialize for NodeListOut<'_, '_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(2))?;
        m.serialize_entry("metadata", &EmptyObject)?;
        m.serialize_entry("items", &RawItems(self.0))?;
        m.end()
    }
}

struct EmptyObject;

impl Serialize for EmptyObject {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_map(Some(0))?.end()
    }
}

struct FailedMap<'b, 'a>(&'b [(&'a str, Arc<str>)]);

impl Serialize for FailedMap<'_, '_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in self.0 {
            m.serialize_entry(k, &**v)?;
        }
        m.end()
    }
}

impl Serialize for ExtenderFilterResult<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("ExtenderFilterResult", 5)?;
        st.serialize_field("Nodes", &self.nodes.as_deref().map(NodeListOut))?;
        st.serialize_field("NodeNames", &self.node_names)?;
        st.serialize_field("FailedNodes", &FailedMap(&self.failed_nodes))?;
        st.serialize_field(
            "FailedAndUnresolvableNodes",
            &FailedMap(&self.failed_and_unresolvable),
        )?;
        st.serialize_field("Error", &self.error)?;
        st.end()
    }
}

// ---- decoding, case-insensitively like Go ----

fn key_is(key: &str, go_name: &str) -> bool {
    key.eq_ignore_ascii_case(go_name)
}

/// A map key that may be borrowed or owned (escaped keys are owned).
struct Key(String);

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object key")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key, E> {
                Ok(Key(v.to_string()))
            }
        }
        d.deserialize_str(V)
    }
}

/// A string that borrows from the input when it has no escapes.
struct Str<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Str<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Str<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a node name")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Str<'de>, E> {
                Ok(Str(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Str<'de>, E> {
                Ok(Str(Cow::Owned(v.to_string())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Str<'de>, E> {
                Ok(Str(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

impl<'de> Deserialize<'de> for ExtenderArgs<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ExtenderArgs<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an ExtenderArgs object with Pod and Nodes or NodeNames")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<ExtenderArgs<'de>, A::Error> {
                let mut out = ExtenderArgs::default();
                while let Some(Key(k)) = map.next_key()? {
                    if key_is(&k, "Pod") {
                        out.pod = map.next_value()?;
                    } else if key_is(&k, "Nodes") {
                        out.nodes = map.next_value()?;
                    } else if key_is(&k, "NodeNames") {
                        let raw: &'de RawValue = map.next_value()?;
                        let names: Option<Vec<Str<'de>>> = serde_json::from_str(raw.get())
                            .map_err(|e| de::Error::custom(format!("NodeNames: {e}")))?;
                        out.node_names = names.map(|v| v.into_iter().map(|s| s.0).collect());
                        out.node_names_json = out.node_names.as_ref().map(|_| raw);
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(out)
            }
        }
        d.deserialize_map(V)
    }
}

impl<'de> Deserialize<'de> for NodeList<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = NodeList<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a NodeList object with items")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<NodeList<'de>, A::Error> {
                let mut items = None;
                while let Some(Key(k)) = map.next_key()? {
                    if key_is(&k, "items") {
                        items = Some(map.next_value_seed(Items(std::marker::PhantomData))?);
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(NodeList {
                    items: items.unwrap_or_default(),
                })
            }
        }
        d.deserialize_map(V)
    }
}

/// `items`, numbering each node so a nameless one can be pointed at.
struct Items<'a>(std::marker::PhantomData<&'a ()>);

impl<'de> DeserializeSeed<'de> for Items<'de> {
    type Value = Vec<RawNode<'de>>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Vec<RawNode<'de>>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an array of Node objects (or null)")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Vec::new())
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0));
                while let Some(raw) = seq.next_element::<&'de RawValue>()? {
                    let name = node_name(raw.get()).map_err(|problem| {
                        de::Error::custom(format!("Nodes.items[{}]: {problem}", out.len()))
                    })?;
                    out.push(RawNode { name, raw });
                }
                Ok(out)
            }
        }
        d.deserialize_any(V)
    }
}

/// `metadata.name` of a node object.
fn node_name(json: &str) -> Result<String, String> {
    #[derive(Deserialize)]
    struct Meta {
        #[serde(default)]
        name: Option<String>,
    }
    #[derive(Deserialize)]
    struct Head {
        #[serde(default)]
        metadata: Option<Meta>,
    }
    let head: Head = serde_json::from_str(json).map_err(|e| format!("not a Node object: {e}"))?;
    match head.metadata.and_then(|m| m.name) {
        Some(n) if !n.is_empty() => Ok(n),
        _ => Err("the node has no metadata.name".into()),
    }
}

impl<'de> Deserialize<'de> for ExtenderBindingArgs {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ExtenderBindingArgs;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "an ExtenderBindingArgs object with PodName, PodNamespace, PodUID and Node",
                )
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<ExtenderBindingArgs, A::Error> {
                let mut out = ExtenderBindingArgs::default();
                while let Some(Key(k)) = map.next_key()? {
                    let slot = if key_is(&k, "PodName") {
                        &mut out.pod_name
                    } else if key_is(&k, "PodNamespace") {
                        &mut out.pod_namespace
                    } else if key_is(&k, "PodUID") {
                        &mut out.pod_uid
                    } else if key_is(&k, "Node") {
                        &mut out.node
                    } else {
                        map.next_value::<IgnoredAny>()?;
                        continue;
                    };
                    *slot = map.next_value::<Option<String>>()?.unwrap_or_default();
                }
                Ok(out)
            }
        }
        d.deserialize_map(V)
    }
}

impl ExtenderBindingArgs {
    /// Every field is required; name the missing ones.
    pub fn validate(&self) -> Result<(), String> {
        let missing: Vec<&str> = [
            ("PodName", &self.pod_name),
            ("PodNamespace", &self.pod_namespace),
            ("PodUID", &self.pod_uid),
            ("Node", &self.node),
        ]
        .iter()
        .filter(|(_, v)| v.is_empty())
        .map(|(k, _)| *k)
        .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "ExtenderBindingArgs is missing {}: PodName, PodNamespace, PodUID and Node are all required",
                missing.join(", ")
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_in_any_case_like_go() {
        let a: ExtenderArgs = serde_json::from_str(
            r#"{"pod":{"metadata":{"name":"p"}},"NODENAMES":["a","b"],"extra":1}"#,
        )
        .unwrap();
        assert_eq!(a.pod.unwrap().metadata.name.as_deref(), Some("p"));
        assert_eq!(a.node_names.unwrap(), ["a", "b"]);
        let b: ExtenderBindingArgs =
            serde_json::from_str(r#"{"podname":"p","PodNamespace":"ns","poduid":"u","NODE":"n"}"#)
                .unwrap();
        assert_eq!(b.pod_uid, "u");
        assert_eq!(b.node, "n");
    }

    #[test]
    fn names_borrow_from_the_body_unless_escaped() {
        let body = r#"{"NodeNames":["plain","esc\u0061ped"]}"#;
        let a: ExtenderArgs = serde_json::from_str(body).unwrap();
        let names = a.node_names.as_ref().unwrap();
        assert!(matches!(names[0], Cow::Borrowed("plain")));
        assert_eq!(names[1], "escaped");
        assert_eq!(a.candidate_names(), ["plain", "escaped"]);
    }

    #[test]
    fn nodes_are_echoed_byte_for_byte() {
        let node = r#"{"metadata":{"name":"n1","labels":{"x":"y"}},"status":{"capacity":{"cpu":"4"}},"future":{"a":[1,2]}}"#;
        let body = format!(r#"{{"Pod":null,"Nodes":{{"metadata":{{}},"items":[{node}]}}}}"#);
        let a: ExtenderArgs = serde_json::from_str(&body).unwrap();
        assert_eq!(a.candidate_names(), ["n1"]);
        let out = serde_json::to_string(&ExtenderFilterResult::passthrough(&a)).unwrap();
        assert!(out.contains(node), "{out}");
        assert!(
            out.starts_with(r#"{"Nodes":{"metadata":{},"items":["#),
            "{out}"
        );
    }

    #[test]
    fn a_nameless_node_is_pointed_at() {
        let e = serde_json::from_str::<ExtenderArgs>(
            r#"{"Nodes":{"items":[{"metadata":{"name":"a"}},{"metadata":{}}]}}"#,
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("Nodes.items[1]: the node has no metadata.name"),
            "{e}"
        );
    }

    #[test]
    fn results_use_the_go_field_names() {
        let r = ExtenderFilterResult {
            node_names: Some(vec!["a"]),
            failed_nodes: vec![("b", "why".into())],
            failed_and_unresolvable: vec![("c", "never".into())],
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"Nodes":null,"NodeNames":["a"],"FailedNodes":{"b":"why"},"FailedAndUnresolvableNodes":{"c":"never"},"Error":""}"#
        );
        let p = vec![HostPriority {
            host: "a",
            score: 7,
        }];
        assert_eq!(
            serde_json::to_string(&p).unwrap(),
            r#"[{"Host":"a","Score":7}]"#
        );
    }

    #[test]
    fn binding_args_name_every_missing_field() {
        let b: ExtenderBindingArgs = serde_json::from_str(r#"{"PodName":"p"}"#).unwrap();
        let e = b.validate().unwrap_err();
        assert!(e.contains("PodNamespace, PodUID, Node"), "{e}");
    }
}
