//! Parsing node files: entries are parsed one by one through serde seeds so that every check
//! runs inside the YAML parser and its error carries the entry's line and field path.

use std::collections::HashMap;
use std::fmt;
use std::marker::PhantomData;

use gm_core::inventory::Link;
use serde::de::value::MapAccessDeserializer;
use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};

use super::{CardSpec, NodeDescription, ProcessSpec, ScriptedEvent, ScriptedEventKind, UsageSpec};
use crate::error::BackendError;
use crate::pci::PciBusId;

/// The top-level fields of a node file.
const TOP_LEVEL_FIELDS: &str = "cards, links, processes, usage, events";

/// Parse and validate a node description (`name` is the file name for messages).
pub(super) fn parse(text: &str, name: &str) -> Result<NodeDescription, BackendError> {
    let plain = |message: String| BackendError::NodeFile {
        file: name.to_string(),
        line: None,
        column: None,
        message,
    };
    let has_content = text.lines().any(|l| {
        let t = l.trim();
        !t.is_empty() && !t.starts_with('#') && t != "---"
    });
    if !has_content {
        return Err(plain(
            "the file is empty; it needs at least a `cards:` list".to_string(),
        ));
    }
    let doc = DocSeed
        .deserialize(serde_yaml_ng::Deserializer::from_str(text))
        .map_err(|e| yaml_error(name, e))?;
    doc.finish(text, name)
}

fn yaml_error(file: &str, e: serde_yaml_ng::Error) -> BackendError {
    let location = e.location();
    let mut message = e.to_string();
    if let Some(l) = &location {
        let suffix = format!(" at line {} column {}", l.line(), l.column());
        if let Some(stripped) = message.strip_suffix(&suffix) {
            message = stripped.to_string();
        }
    }
    BackendError::NodeFile {
        file: file.to_string(),
        line: location.as_ref().map(|l| l.line()),
        column: location.as_ref().map(|l| l.column()),
        message,
    }
}

// ---------------------------------------------------------------------------------------------
// Raw file shapes.

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawCard {
    uuid: String,
    model: String,
    #[serde(rename = "memoryMiB", alias = "memoryMib")]
    memory_mib: u64,
    minor: u32,
    #[serde(default)]
    pci_bus_id: Option<PciBusId>,
    #[serde(default, deserialize_with = "numa_node")]
    numa_node: Option<u32>,
}

/// `numaNode`: a whole number; negative (as sysfs writes for "no NUMA") or null is unknown.
fn numa_node<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    struct V;
    impl Visitor<'_> for V {
        type Value = Option<u32>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a NUMA node number (negative or left out: unknown)")
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Option<u32>, E> {
            if v < 0 {
                return Ok(None);
            }
            self.visit_u64(v as u64)
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Option<u32>, E> {
            u32::try_from(v)
                .map(Some)
                .map_err(|_| E::custom(format!("numaNode {v} is too large")))
        }
        fn visit_unit<E: de::Error>(self) -> Result<Option<u32>, E> {
            Ok(None)
        }
        fn visit_none<E: de::Error>(self) -> Result<Option<u32>, E> {
            Ok(None)
        }
    }
    d.deserialize_any(V)
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawProcess {
    card: String,
    pid: u32,
    #[serde(rename = "usedMemoryMiB", alias = "usedMemoryMib")]
    used_memory_mib: u64,
    #[serde(default)]
    sm_percent: u32,
    #[serde(default)]
    start_ms: u64,
    #[serde(default)]
    end_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawUsage {
    card: String,
    #[serde(default)]
    at_ms: u64,
    sm_percent: u32,
    #[serde(rename = "memoryUsedMiB", alias = "memoryUsedMib")]
    memory_used_mib: u64,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "camelCase")]
enum RawEventKind {
    Xid,
    DoubleBitEcc,
    Lost,
    Recovered,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawEvent {
    at_ms: u64,
    card: String,
    kind: RawEventKind,
    #[serde(default)]
    code: Option<u64>,
}

/// What the checks of later sections need to know about the cards.
#[derive(Debug, Default)]
struct KnownCards {
    /// uuid → (file position, memory MiB).
    by_uuid: HashMap<String, (usize, u64)>,
    /// uuids in file order, for messages.
    order: Vec<String>,
}

impl KnownCards {
    fn from_raw(cards: &[RawCard]) -> Self {
        Self {
            by_uuid: cards
                .iter()
                .enumerate()
                .map(|(i, c)| (c.uuid.clone(), (i, c.memory_mib)))
                .collect(),
            order: cards.iter().map(|c| c.uuid.clone()).collect(),
        }
    }

    /// Memory of the card `uuid`, or an error listing the known cards.
    fn memory(&self, uuid: &str) -> Result<u64, String> {
        self.by_uuid.get(uuid).map(|(_, m)| *m).ok_or_else(|| {
            format!(
                "card {uuid:?} is not one of this node's cards; use a uuid from `cards`: {}",
                self.order.join(", ")
            )
        })
    }

    fn label(&self, position: usize) -> String {
        match self.order.get(position) {
            Some(u) => format!("cards[{position}] ({u})"),
            None => format!("cards[{position}]"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Per-entry checks. Each returns the problem and what is allowed.

#[derive(Debug, Default)]
struct CardChecker {
    uuids: HashMap<String, usize>,
    minors: HashMap<u32, usize>,
    buses: HashMap<PciBusId, usize>,
    /// Whether the first card had a bus ID.
    first_has_bus: Option<bool>,
    seen: usize,
}

impl CardChecker {
    fn check(&mut self, c: &RawCard) -> Result<(), String> {
        let pos = self.seen;
        self.seen += 1;
        let uuid = c.uuid.trim();
        if uuid.is_empty() {
            return Err("uuid is empty; give the card's uuid, e.g. GPU-5f3c…".into());
        }
        if uuid.len() != c.uuid.len() || uuid.contains(|ch: char| ch.is_whitespace() || ch == ',') {
            return Err(format!(
                "uuid {:?} contains spaces or commas; a uuid is one word such as GPU-5f3c…",
                c.uuid
            ));
        }
        if c.model.trim().is_empty() || c.model.contains('\n') {
            return Err("model is empty; give the name NVML reports, e.g. Tesla T4".into());
        }
        if c.memory_mib < gm_core::resources::BLOCK_MIB {
            return Err(format!(
                "memoryMiB is {}; a card needs at least {} MiB (one vcuda-memory block)",
                c.memory_mib,
                gm_core::resources::BLOCK_MIB
            ));
        }
        if let Some(prev) = self.uuids.insert(c.uuid.clone(), pos) {
            return Err(format!(
                "uuid {} is already used by cards[{prev}]; each card needs its own uuid",
                c.uuid
            ));
        }
        if let Some(prev) = self.minors.insert(c.minor, pos) {
            return Err(format!(
                "minor {} is already used by cards[{prev}]; each card has its own /dev/nvidiaN",
                c.minor
            ));
        }
        let has_bus = c.pci_bus_id.is_some();
        match self.first_has_bus {
            None => self.first_has_bus = Some(has_bus),
            Some(first) if first != has_bus => {
                return Err(
                    "pciBusId is given for some cards but not others; give every card a \
                     pciBusId (cards are then ordered by it) or none (file order is kept)"
                        .into(),
                )
            }
            Some(_) => {}
        }
        if let Some(bus) = c.pci_bus_id {
            if let Some(prev) = self.buses.insert(bus, pos) {
                return Err(format!(
                    "pciBusId {bus} is already used by cards[{prev}]; each card has its own"
                ));
            }
        }
        Ok(())
    }
}

fn check_percent(field: &str, v: u32) -> Result<(), String> {
    if v > 100 {
        return Err(format!("{field} is {v}; it must be 0 to 100"));
    }
    Ok(())
}

#[derive(Debug, Default)]
struct ProcessChecker {
    /// (card, pid, start, end) of earlier entries.
    seen: Vec<(String, u32, u64, Option<u64>)>,
}

impl ProcessChecker {
    fn check(&mut self, p: &RawProcess, cards: Option<&KnownCards>) -> Result<(), String> {
        if p.pid == 0 {
            return Err("pid is 0; give the host PID of the process (1 or more)".into());
        }
        check_percent("smPercent", p.sm_percent)?;
        if let Some(end) = p.end_ms {
            if end <= p.start_ms {
                return Err(format!(
                    "endMs {end} is not after startMs {}; leave endMs out for a process that \
                     never exits",
                    p.start_ms
                ));
            }
        }
        if let Some(cards) = cards {
            let memory = cards.memory(&p.card)?;
            if p.used_memory_mib > memory {
                return Err(format!(
                    "usedMemoryMiB {} is more than the card's {memory} MiB",
                    p.used_memory_mib
                ));
            }
        }
        let overlaps = |s2: u64, e2: Option<u64>| {
            let a_before_b = p.end_ms.is_some_and(|e| e <= s2);
            let b_before_a = e2.is_some_and(|e| e <= p.start_ms);
            !a_before_b && !b_before_a
        };
        if self
            .seen
            .iter()
            .any(|(c, pid, s, e)| *c == p.card && *pid == p.pid && overlaps(*s, *e))
        {
            return Err(format!(
                "pid {} already runs on card {} at an overlapping time; list a process once \
                 per card, or give the entries separate startMs/endMs windows",
                p.pid, p.card
            ));
        }
        self.seen
            .push((p.card.clone(), p.pid, p.start_ms, p.end_ms));
        Ok(())
    }
}

fn check_usage(u: &RawUsage, cards: Option<&KnownCards>) -> Result<(), String> {
    check_percent("smPercent", u.sm_percent)?;
    if let Some(cards) = cards {
        let memory = cards.memory(&u.card)?;
        if u.memory_used_mib > memory {
            return Err(format!(
                "memoryUsedMiB {} is more than the card's {memory} MiB",
                u.memory_used_mib
            ));
        }
    }
    Ok(())
}

fn check_event(e: &RawEvent, cards: Option<&KnownCards>) -> Result<(), String> {
    match (e.kind, e.code) {
        (RawEventKind::Xid, None) => {
            return Err("an xid event needs a code (the XID number, e.g. code: 79)".into())
        }
        (RawEventKind::Xid, Some(0)) => {
            return Err("code 0 is not an XID; XID numbers start at 1".into())
        }
        (RawEventKind::Xid, Some(_)) => {}
        (_, Some(_)) => {
            return Err("only xid events take a code; remove `code` or use kind: xid".into())
        }
        (_, None) => {}
    }
    if let Some(cards) = cards {
        cards.memory(&e.card)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Seeds: parse entries one by one so that checks run inside the parser and errors carry the
// entry's position.

/// A list of mappings, each checked right after it is parsed.
struct ListSeed<'c, T> {
    what: &'static str,
    item: &'static str,
    check: &'c mut dyn FnMut(&T) -> Result<(), String>,
    _t: PhantomData<fn() -> T>,
}

impl<'c, T> ListSeed<'c, T> {
    fn new(
        what: &'static str,
        item: &'static str,
        check: &'c mut dyn FnMut(&T) -> Result<(), String>,
    ) -> Self {
        Self {
            what,
            item,
            check,
            _t: PhantomData,
        }
    }
}

impl<'de, T: Deserialize<'de>> DeserializeSeed<'de> for ListSeed<'_, T> {
    type Value = Vec<T>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Vec<T>, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de, T: Deserialize<'de>> Visitor<'de> for ListSeed<'_, T> {
    type Value = Vec<T>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a list of {}", self.what)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
        let check = self.check;
        let mut out = Vec::new();
        while let Some(v) = seq.next_element_seed(ItemSeed {
            what: self.item,
            check: &mut *check,
            _t: PhantomData,
        })? {
            out.push(v);
        }
        Ok(out)
    }
}

struct ItemSeed<'c, T> {
    what: &'static str,
    check: &'c mut dyn FnMut(&T) -> Result<(), String>,
    _t: PhantomData<fn() -> T>,
}

impl<'de, T: Deserialize<'de>> DeserializeSeed<'de> for ItemSeed<'_, T> {
    type Value = T;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<T, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, T: Deserialize<'de>> Visitor<'de> for ItemSeed<'_, T> {
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a {} (a mapping of its fields)", self.what)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
        let v = T::deserialize(MapAccessDeserializer::new(map))?;
        (self.check)(&v).map_err(de::Error::custom)?;
        Ok(v)
    }
}

/// The link matrix: a list of rows, each a list of tokens.
struct LinksSeed<'a> {
    cards: Option<&'a KnownCards>,
}

impl<'de> DeserializeSeed<'de> for LinksSeed<'_> {
    type Value = Vec<Vec<Link>>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for LinksSeed<'_> {
    type Value = Vec<Vec<Link>>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of rows, one per card, e.g. [X, NV12]")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut rows: Vec<Vec<Link>> = Vec::new();
        let width = self.cards.map(|c| c.order.len());
        loop {
            let row_seed = RowSeed {
                row: rows.len(),
                rows: &rows,
                width: width.or_else(|| rows.first().map(Vec::len)),
                cards: self.cards,
            };
            match seq.next_element_seed(row_seed)? {
                Some(row) => rows.push(row),
                None => break,
            }
        }
        if let Some(n) = width {
            if rows.len() != n {
                return Err(de::Error::custom(format!(
                    "has {} rows for {n} cards; give one row per card, in the order of `cards`",
                    rows.len()
                )));
            }
        }
        Ok(rows)
    }
}

struct RowSeed<'a> {
    row: usize,
    rows: &'a [Vec<Link>],
    width: Option<usize>,
    cards: Option<&'a KnownCards>,
}

impl<'de> DeserializeSeed<'de> for RowSeed<'_> {
    type Value = Vec<Link>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Vec<Link>, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for RowSeed<'_> {
    type Value = Vec<Link>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a row of link tokens such as [X, PIX, SYS]")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<Link>, A::Error> {
        let mut row = Vec::new();
        loop {
            let token = TokenSeed {
                row: self.row,
                col: row.len(),
                rows: self.rows,
                cards: self.cards,
            };
            match seq.next_element_seed(token)? {
                Some(l) => row.push(l),
                None => break,
            }
        }
        if let Some(w) = self.width {
            if row.len() != w {
                return Err(de::Error::custom(format!(
                    "row for {} has {} entries; it needs {w}, one per card",
                    label(self.cards, self.row),
                    row.len()
                )));
            }
        }
        Ok(row)
    }
}

fn label(cards: Option<&KnownCards>, i: usize) -> String {
    match cards {
        Some(c) => c.label(i),
        None => format!("cards[{i}]"),
    }
}

struct TokenSeed<'a> {
    row: usize,
    col: usize,
    rows: &'a [Vec<Link>],
    cards: Option<&'a KnownCards>,
}

impl<'de> DeserializeSeed<'de> for TokenSeed<'_> {
    type Value = Link;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Link, D::Error> {
        d.deserialize_str(self)
    }
}

impl Visitor<'_> for TokenSeed<'_> {
    type Value = Link;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a link token: X, NV<n>, PIX, PXB, PHB, NODE (or SOC) or SYS")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Link, E> {
        let link: Link = v.parse().map_err(E::custom)?;
        let (i, j) = (self.row, self.col);
        let from = label(self.cards, i);
        if i == j && link != Link::SelfLink {
            return Err(E::custom(format!(
                "{v:?} on the diagonal ({from} to itself); the diagonal must be X"
            )));
        }
        if i != j && link == Link::SelfLink {
            return Err(E::custom(format!(
                "X between {from} and {}; X belongs on the diagonal only, use NV<n>, PIX, PXB, \
                 PHB, NODE or SYS",
                label(self.cards, j)
            )));
        }
        if j < i {
            if let Some(other) = self.rows.get(j).and_then(|r| r.get(i)) {
                if *other != link {
                    return Err(E::custom(format!(
                        "{link} from {from} to {} but links[{j}][{i}] is {other}; the matrix \
                         must be symmetric",
                        label(self.cards, j)
                    )));
                }
            }
        }
        Ok(link)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Key {
    Cards,
    Links,
    Processes,
    Usage,
    Events,
}

impl Key {
    fn name(self) -> &'static str {
        match self {
            Key::Cards => "cards",
            Key::Links => "links",
            Key::Processes => "processes",
            Key::Usage => "usage",
            Key::Events => "events",
        }
    }
}

struct KeySeed;

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Key;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Key, D::Error> {
        d.deserialize_str(self)
    }
}

impl Visitor<'_> for KeySeed {
    type Value = Key;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "one of the fields {TOP_LEVEL_FIELDS}")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Key, E> {
        Ok(match v {
            "cards" => Key::Cards,
            "links" => Key::Links,
            "processes" => Key::Processes,
            "usage" => Key::Usage,
            "events" => Key::Events,
            other => {
                return Err(E::custom(format!(
                    "unknown field `{other}`; the fields of a node file are {TOP_LEVEL_FIELDS}"
                )))
            }
        })
    }
}

#[derive(Debug, Default)]
struct Doc {
    cards: Option<Vec<RawCard>>,
    links: Option<Vec<Vec<Link>>>,
    processes: Vec<RawProcess>,
    usage: Vec<RawUsage>,
    events: Vec<RawEvent>,
    /// Sections parsed before `cards` (their card references are checked afterwards).
    before_cards: Vec<Key>,
}

struct DocSeed;

impl<'de> DeserializeSeed<'de> for DocSeed {
    type Value = Doc;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Doc, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for DocSeed {
    type Value = Doc;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "a node description: a mapping with the fields {TOP_LEVEL_FIELDS}"
        )
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Doc, A::Error> {
        let mut doc = Doc::default();
        let mut seen: Vec<Key> = Vec::new();
        while let Some(key) = map.next_key_seed(KeySeed)? {
            if seen.contains(&key) {
                return Err(de::Error::custom(format!(
                    "field `{}` appears twice; give it once",
                    key.name()
                )));
            }
            seen.push(key);
            let known = doc.cards.as_deref().map(KnownCards::from_raw);
            if known.is_none() && key != Key::Cards {
                doc.before_cards.push(key);
            }
            match key {
                Key::Cards => {
                    let mut checker = CardChecker::default();
                    let mut check = |c: &RawCard| checker.check(c);
                    doc.cards =
                        Some(map.next_value_seed(ListSeed::new("cards", "card", &mut check))?);
                }
                Key::Links => {
                    doc.links = Some(map.next_value_seed(LinksSeed {
                        cards: known.as_ref(),
                    })?);
                }
                Key::Processes => {
                    let mut checker = ProcessChecker::default();
                    let mut check = |p: &RawProcess| checker.check(p, known.as_ref());
                    doc.processes =
                        map.next_value_seed(ListSeed::new("processes", "process", &mut check))?;
                }
                Key::Usage => {
                    let mut check = |u: &RawUsage| check_usage(u, known.as_ref());
                    doc.usage = map.next_value_seed(ListSeed::new(
                        "usage samples",
                        "usage sample",
                        &mut check,
                    ))?;
                }
                Key::Events => {
                    let mut check = |e: &RawEvent| check_event(e, known.as_ref());
                    doc.events =
                        map.next_value_seed(ListSeed::new("events", "event", &mut check))?;
                }
            }
        }
        Ok(doc)
    }
}

impl Doc {
    /// Cross-section checks, sorting and the final inventory validation.
    fn finish(self, text: &str, name: &str) -> Result<NodeDescription, BackendError> {
        let plain = |message: String| BackendError::NodeFile {
            file: name.to_string(),
            line: None,
            column: None,
            message,
        };
        let at_line = |needle: &str, message: String| BackendError::NodeFile {
            file: name.to_string(),
            line: find_line(text, needle),
            column: None,
            message,
        };
        let raw_cards = self.cards.ok_or_else(|| {
            plain(
                "missing field `cards`: list the node's cards (uuid, model, memoryMiB, minor, \
                 pciBusId, numaNode)"
                    .into(),
            )
        })?;
        let known = KnownCards::from_raw(&raw_cards);
        let n = raw_cards.len();

        // Sections that came before `cards` could not check their card references then.
        if !self.before_cards.is_empty() {
            if let Some(links) = &self.links {
                if links.len() != n || links.iter().any(|r| r.len() != n) {
                    return Err(plain(format!(
                        "links: the matrix must be {n}x{n}, one row and one column per card in \
                         the order of `cards`"
                    )));
                }
            }
            let mut pc = ProcessChecker::default();
            for (i, p) in self.processes.iter().enumerate() {
                pc.check(p, Some(&known))
                    .map_err(|m| at_line(&p.card, format!("processes[{i}]: {m}")))?;
            }
            for (i, u) in self.usage.iter().enumerate() {
                check_usage(u, Some(&known))
                    .map_err(|m| at_line(&u.card, format!("usage[{i}]: {m}")))?;
            }
            for (i, e) in self.events.iter().enumerate() {
                check_event(e, Some(&known))
                    .map_err(|m| at_line(&e.card, format!("events[{i}]: {m}")))?;
            }
        }

        let links = match self.links {
            Some(l) => l,
            None if n <= 1 => (0..n).map(|_| vec![Link::SelfLink]).collect(),
            None => {
                return Err(plain(format!(
                    "missing field `links`: {n} cards need a {n}x{n} link matrix (rows like \
                     [X, NV12, SYS], in the order of `cards`)"
                )))
            }
        };

        // Card index = position after sorting by PCI bus ID (stable: file order otherwise).
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by_key(|&i| raw_cards[i].pci_bus_id);
        let cards: Vec<CardSpec> = order
            .iter()
            .map(|&i| {
                let c = &raw_cards[i];
                CardSpec {
                    file_position: i,
                    uuid: c.uuid.clone(),
                    model: c.model.trim().to_string(),
                    memory_mib: c.memory_mib,
                    minor: c.minor,
                    pci_bus_id: c.pci_bus_id,
                    numa_node: c.numa_node,
                }
            })
            .collect();
        let links: Vec<Vec<Link>> = order
            .iter()
            .map(|&i| order.iter().map(|&j| links[i][j]).collect())
            .collect();

        let mut events: Vec<ScriptedEvent> = self
            .events
            .iter()
            .map(|e| ScriptedEvent {
                at_ms: e.at_ms,
                card: e.card.clone(),
                kind: match e.kind {
                    RawEventKind::Xid => ScriptedEventKind::Xid {
                        code: e.code.unwrap_or_default(),
                    },
                    RawEventKind::DoubleBitEcc => ScriptedEventKind::DoubleBitEcc,
                    RawEventKind::Lost => ScriptedEventKind::Lost,
                    RawEventKind::Recovered => ScriptedEventKind::Recovered,
                },
            })
            .collect();
        events.sort_by_key(|e| e.at_ms);

        let desc = NodeDescription {
            name: name.to_string(),
            cards,
            links,
            processes: self
                .processes
                .into_iter()
                .map(|p| ProcessSpec {
                    card: p.card,
                    pid: p.pid,
                    used_memory_mib: p.used_memory_mib,
                    sm_percent: p.sm_percent,
                    start_ms: p.start_ms,
                    end_ms: p.end_ms,
                })
                .collect(),
            usage: self
                .usage
                .into_iter()
                .map(|u| UsageSpec {
                    card: u.card,
                    at_ms: u.at_ms,
                    sm_percent: u.sm_percent,
                    memory_used_mib: u.memory_used_mib,
                })
                .collect(),
            events,
        };
        // The same invariants every inventory must satisfy (belt and braces: the checks above
        // already cover them with better positions).
        desc.inventory().validate().map_err(|e| {
            plain(format!(
                "{e} (card numbers are card indices after sorting by pciBusId)"
            ))
        })?;
        Ok(desc)
    }
}

/// 1-based line of the first occurrence of `needle` as a whole word.
fn find_line(text: &str, needle: &str) -> Option<usize> {
    if needle.is_empty() {
        return None;
    }
    text.lines()
        .position(|line| {
            line.match_indices(needle).any(|(at, _)| {
                let before = line[..at].chars().next_back();
                let after = line[at + needle.len()..].chars().next();
                let word = |c: Option<char>| {
                    c.is_some_and(|c| c.is_alphanumeric() || c == '-' || c == '_')
                };
                !word(before) && !word(after)
            })
        })
        .map(|i| i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node_file::tests::TWO;

    fn err(text: &str) -> (Option<usize>, String) {
        match NodeDescription::parse(text, "test.yaml") {
            Ok(d) => panic!("expected an error, parsed {d:?}"),
            Err(e) => {
                let line = match &e {
                    BackendError::NodeFile { line, .. } => *line,
                    other => panic!("expected a node file error, got {other:?}"),
                };
                (line, e.to_string())
            }
        }
    }

    #[test]
    fn invalid_link_token_names_file_line_and_allowed_tokens() {
        let text = TWO.replace("  - [PIX, X]", "  - [PCI, X]");
        let (line, msg) = err(&text);
        assert_eq!(line, Some(14), "{msg}");
        assert!(msg.starts_with("node file test.yaml, line 14"), "{msg}");
        assert!(msg.contains("links[1][0]"), "{msg}");
        assert!(msg.contains("\"PCI\""), "{msg}");
        assert!(
            msg.contains("PIX") && msg.contains("SYS") && msg.contains("NV<"),
            "{msg}"
        );
    }

    #[test]
    fn asymmetric_matrix_names_the_line_and_both_entries() {
        let text = TWO.replace("  - [PIX, X]", "  - [SYS, X]");
        let (line, msg) = err(&text);
        assert_eq!(line, Some(14), "{msg}");
        assert!(
            msg.contains("symmetric") && msg.contains("links[0][1] is PIX"),
            "{msg}"
        );
        assert!(msg.contains("GPU-a") && msg.contains("GPU-b"), "{msg}");
    }

    #[test]
    fn diagonal_must_be_x_and_x_only_on_the_diagonal() {
        let (line, msg) = err(&TWO.replace("  - [X, PIX]", "  - [PIX, PIX]"));
        assert_eq!(line, Some(13));
        assert!(msg.contains("diagonal must be X"), "{msg}");
        let (_, msg) = err(&TWO.replace("  - [X, PIX]", "  - [X, X]"));
        assert!(msg.contains("diagonal only"), "{msg}");
    }

    #[test]
    fn wrong_matrix_shape_is_reported_with_the_card_count() {
        let (line, msg) = err(&TWO.replace("  - [PIX, X]", "  - [PIX, X, SYS]"));
        assert_eq!(line, Some(14), "{msg}");
        assert!(msg.contains("needs 2, one per card"), "{msg}");
        let (_, msg) = err(&TWO.replace("  - [PIX, X]\n", ""));
        assert!(msg.contains("1 rows for 2 cards"), "{msg}");
    }

    #[test]
    fn duplicate_uuid_points_at_the_second_card() {
        let (line, msg) = err(&TWO.replace("uuid: GPU-a", "uuid: GPU-b"));
        assert_eq!(line, Some(7), "{msg}");
        assert!(
            msg.contains("cards[1]") && msg.contains("already used by cards[0]"),
            "{msg}"
        );
    }

    #[test]
    fn duplicate_minor_and_bus_id_are_rejected() {
        let (_, msg) = err(&TWO.replace("minor: 0", "minor: 1"));
        assert!(msg.contains("minor 1 is already used"), "{msg}");
        let (_, msg) = err(&TWO.replace("0000:3b:00.0", "0000:5e:00.0"));
        assert!(
            msg.contains("pciBusId 0000:5e:00.0 is already used"),
            "{msg}"
        );
    }

    #[test]
    fn bus_ids_for_some_cards_only_is_an_error() {
        let (_, msg) = err(&TWO.replace("    pciBusId: 0000:3b:00.0\n", ""));
        assert!(msg.contains("some cards but not others"), "{msg}");
    }

    #[test]
    fn malformed_bus_id_names_its_line_and_the_expected_form() {
        let (line, msg) = err(&TWO.replace("0000:3b:00.0", "3b-00"));
        assert_eq!(line, Some(11), "{msg}");
        assert!(
            msg.contains("cards[1].pciBusId") && msg.contains("0000:3b:00.0"),
            "{msg}"
        );
    }

    #[test]
    fn too_little_memory_is_rejected() {
        let (line, msg) = err(&TWO.replace(
            "memoryMiB: 15360\n    minor: 0",
            "memoryMiB: 100\n    minor: 0",
        ));
        assert_eq!(line, Some(7), "{msg}");
        assert!(msg.contains("at least 256 MiB"), "{msg}");
    }

    #[test]
    fn unknown_fields_list_what_is_allowed() {
        let (line, msg) = err(&format!("{TWO}gpus: 3\n"));
        assert_eq!(line, Some(15), "{msg}");
        assert!(
            msg.contains("unknown field `gpus`") && msg.contains("events"),
            "{msg}"
        );
        let (_, msg) = err(&TWO.replace("minor: 0", "minor: 0\n    memory: 3"));
        assert!(
            msg.contains("unknown field `memory`") && msg.contains("memoryMiB"),
            "{msg}"
        );
    }

    #[test]
    fn events_must_name_a_known_card_and_xids_need_a_code() {
        let (line, msg) = err(&format!(
            "{TWO}events:\n  - {{atMs: 5, card: GPU-q, kind: lost}}\n"
        ));
        assert_eq!(line, Some(16), "{msg}");
        assert!(
            msg.contains("\"GPU-q\"") && msg.contains("GPU-b, GPU-a"),
            "{msg}"
        );
        let (_, msg) = err(&format!(
            "{TWO}events:\n  - {{atMs: 5, card: GPU-a, kind: xid}}\n"
        ));
        assert!(msg.contains("needs a code"), "{msg}");
        let (_, msg) = err(&format!(
            "{TWO}events:\n  - {{atMs: 5, card: GPU-a, kind: boom}}\n"
        ));
        assert!(
            msg.contains("unknown variant `boom`") && msg.contains("doubleBitEcc"),
            "{msg}"
        );
    }

    #[test]
    fn references_before_the_cards_section_are_still_checked() {
        let text = format!("events:\n  - {{atMs: 5, card: GPU-q, kind: lost}}\n{TWO}");
        let (line, msg) = err(&text);
        assert_eq!(line, Some(2), "{msg}");
        assert!(msg.contains("events[0]") && msg.contains("GPU-q"), "{msg}");
    }

    #[test]
    fn process_checks_cover_percent_memory_window_and_duplicates() {
        let p = |s: &str| {
            format!("{TWO}processes:\n  - {{card: GPU-a, pid: 10, usedMemoryMiB: 100{s}}}\n")
        };
        let (_, msg) = err(&p(", smPercent: 101"));
        assert!(msg.contains("0 to 100"), "{msg}");
        let (_, msg) = err(&p(", startMs: 50, endMs: 50"));
        assert!(msg.contains("not after startMs"), "{msg}");
        let (_, msg) = err(&TWO.replace(
            "links:",
            "processes:\n  - {card: GPU-a, pid: 1, usedMemoryMiB: 99999}\nlinks:",
        ));
        assert!(msg.contains("more than the card's 15360 MiB"), "{msg}");
        let twice = format!(
            "{TWO}processes:\n  - {{card: GPU-a, pid: 7, usedMemoryMiB: 1}}\n  - {{card: GPU-a, pid: 7, usedMemoryMiB: 2, startMs: 10}}\n"
        );
        let (line, msg) = err(&twice);
        assert_eq!(line, Some(17), "{msg}");
        assert!(msg.contains("overlapping"), "{msg}");
    }

    #[test]
    fn empty_or_non_mapping_files_get_a_clear_error() {
        let (_, msg) = err("# only a comment\n");
        assert!(msg.contains("empty") && msg.contains("cards"), "{msg}");
        let (_, msg) = err("just a string\n");
        assert!(msg.contains("node description"), "{msg}");
        let (_, msg) = err("links: []\n");
        assert!(msg.contains("missing field `cards`"), "{msg}");
        let (_, msg) = err("cards: [{uuid: GPU-a, model: M, memoryMiB: 1024, minor: 0}, {uuid: GPU-b, model: M, memoryMiB: 1024, minor: 1}]\n");
        assert!(msg.contains("missing field `links`"), "{msg}");
    }

    #[test]
    fn yaml_syntax_errors_carry_the_position() {
        let (line, msg) = err("cards:\n  - uuid: [unclosed\n");
        assert!(line.is_some(), "{msg}");
        assert!(msg.starts_with("node file test.yaml, line"), "{msg}");
    }

    #[test]
    fn single_card_needs_no_matrix_and_soc_reads_as_node() {
        let d = NodeDescription::parse(
            "cards: [{uuid: GPU-a, model: M, memoryMiB: 1024, minor: 0, numaNode: 1}]\n",
            "t",
        )
        .unwrap();
        assert_eq!(d.links, vec![vec![Link::SelfLink]]);
        assert_eq!(d.cards[0].numa_node, Some(1));
        for unknown in ["-1", "null", "~"] {
            let d = NodeDescription::parse(
                &format!("cards: [{{uuid: GPU-a, model: M, memoryMiB: 1024, minor: 0, numaNode: {unknown}}}]\n"),
                "t",
            )
            .unwrap();
            assert_eq!(d.cards[0].numa_node, None, "{unknown}");
        }
        let (line, msg) =
            err("cards:\n  - {uuid: GPU-a, model: M, memoryMiB: 1024, minor: 0, numaNode: one}\n");
        assert_eq!(line, Some(2), "{msg}");
        assert!(
            msg.contains("cards[0].numaNode") && msg.contains("NUMA node number"),
            "{msg}"
        );
        let d = NodeDescription::parse(&TWO.replace("PIX", "SOC"), "t").unwrap();
        assert_eq!(d.links[0][1], Link::Node);
    }

    #[test]
    fn find_line_matches_whole_words_only() {
        let text = "a: GPU-ab\nb: GPU-a\n";
        assert_eq!(find_line(text, "GPU-a"), Some(2));
        assert_eq!(find_line(text, "GPU-x"), None);
    }
}
