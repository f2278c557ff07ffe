//! Card health decisions: which NVML XID errors make a card unhealthy.
//!
//! Most XIDs are raised by applications (a bad kernel, a page fault in user code) and say
//! nothing about the card. Like NVIDIA's device plugin we ignore those by default: 13 (graphics
//! engine exception), 31 (GPU memory page fault), 43 (GPU stopped processing), 45 (preemptive
//! cleanup), 68 (video processor exception) and 109 (context switch timeout). Every other XID
//! marks the card unhealthy until a re-probe finds it answering again.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

/// XIDs caused by applications, ignored by default.
pub const DEFAULT_IGNORED_XIDS: [u64; 6] = [13, 31, 43, 45, 68, 109];

/// Which XIDs mark a card unhealthy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XidPolicy {
    ignored: BTreeSet<u64>,
    /// Forced critical even if listed as ignored.
    forced: BTreeSet<u64>,
    /// Health checking by XID switched off entirely.
    disabled: bool,
}

impl Default for XidPolicy {
    fn default() -> Self {
        Self {
            ignored: DEFAULT_IGNORED_XIDS.into_iter().collect(),
            forced: BTreeSet::new(),
            disabled: false,
        }
    }
}

/// A malformed XID list.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid XID list {value:?}: {problem}; use comma-separated XID numbers such as 13,31 or the word all")]
pub struct XidListError {
    pub value: String,
    pub problem: String,
}

fn parse_list(value: &str) -> Result<(bool, BTreeSet<u64>), XidListError> {
    let mut out = BTreeSet::new();
    let mut all = false;
    for part in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if part.eq_ignore_ascii_case("all") {
            all = true;
            continue;
        }
        let n = part.parse::<u64>().map_err(|_| XidListError {
            value: value.to_string(),
            problem: format!("{part:?} is not a number"),
        })?;
        out.insert(n);
    }
    Ok((all, out))
}

impl XidPolicy {
    /// Default ignore list, plus extra XIDs to ignore (`all` switches XID health off), minus
    /// XIDs forced critical (`all` makes every XID critical).
    pub fn new(extra_ignored: &str, forced_critical: &str) -> Result<Self, XidListError> {
        let mut p = Self::default();
        let (ignore_all, extra) = parse_list(extra_ignored)?;
        let (force_all, forced) = parse_list(forced_critical)?;
        p.ignored.extend(extra);
        p.disabled = ignore_all && !force_all;
        if force_all {
            p.ignored.clear();
        }
        p.forced = forced;
        Ok(p)
    }

    /// Does this XID make the card unhealthy?
    pub fn is_critical(&self, xid: u64) -> bool {
        if self.forced.contains(&xid) {
            return true;
        }
        !self.disabled && !self.ignored.contains(&xid)
    }
}

impl FromStr for XidPolicy {
    type Err = XidListError;
    /// Parse an ignore list (see [`XidPolicy::new`]).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s, "")
    }
}

impl fmt::Display for XidPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.disabled {
            return f.write_str("XID health checks disabled");
        }
        let ig: Vec<String> = self.ignored.iter().map(u64::to_string).collect();
        write!(f, "ignoring XIDs {}", ig.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn application_xids_are_ignored_and_hardware_ones_are_critical() {
        let p = XidPolicy::default();
        for x in DEFAULT_IGNORED_XIDS {
            assert!(!p.is_critical(x), "{x}");
        }
        for x in [48, 63, 64, 74, 79, 92, 94, 95, 119] {
            assert!(p.is_critical(x), "{x}");
        }
    }

    #[test]
    fn operators_can_ignore_more_force_some_or_disable() {
        let p = XidPolicy::new("79, 48", "13").unwrap();
        assert!(!p.is_critical(79) && !p.is_critical(48));
        assert!(p.is_critical(13));
        let off = XidPolicy::new("all", "").unwrap();
        assert!(!off.is_critical(79));
        let strict = XidPolicy::new("", "all").unwrap();
        assert!(strict.is_critical(13));
        let e = XidPolicy::new("13,x", "").unwrap_err().to_string();
        assert!(e.contains("\"x\" is not a number"), "{e}");
    }
}
