//! PCI bus addresses: parsing the forms NVML, sysfs and users write, ordering, and one
//! canonical spelling.

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A PCI address `domain:bus:device.function`.
///
/// Accepted spellings: `00000000:3B:00.0` (NVML), `0000:3b:00.0` (sysfs, lspci -D) and
/// `3b:00.0` (lspci; domain 0), in any letter case. The canonical form ([`fmt::Display`]) is the
/// sysfs one: lower-case hex, a 4-digit domain (8 digits only when the domain needs them).
/// Ordering is numeric (domain, bus, device, function), which is the order NVIDIA's tools use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciBusId {
    /// PCI domain (segment).
    pub domain: u32,
    /// Bus number.
    pub bus: u8,
    /// Device number (0..=31).
    pub device: u8,
    /// Function number (0..=7).
    pub function: u8,
}

/// A PCI address that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid PCI bus ID {0:?}: write it as domain:bus:device.function in hex, \
     e.g. 0000:3b:00.0 or 00000000:3B:00.0 (device 00-1f, function 0-7)"
)]
pub struct PciParseError(pub String);

impl FromStr for PciBusId {
    type Err = PciParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || PciParseError(s.to_string());
        let t = s.trim();
        let (rest, function) = t.rsplit_once('.').ok_or_else(bad)?;
        let parts: Vec<&str> = rest.split(':').collect();
        let (domain, bus, device) = match parts.as_slice() {
            [d, b, v] => (*d, *b, *v),
            [b, v] => ("0", *b, *v),
            _ => return Err(bad()),
        };
        let hex = |x: &str, max_len: usize| {
            if x.is_empty() || x.len() > max_len || !x.chars().all(|c| c.is_ascii_hexdigit()) {
                None
            } else {
                u32::from_str_radix(x, 16).ok()
            }
        };
        let domain = hex(domain, 8).ok_or_else(bad)?;
        let bus = hex(bus, 2).ok_or_else(bad)?;
        let device = hex(device, 2).filter(|d| *d <= 0x1f).ok_or_else(bad)?;
        let function = hex(function, 1).filter(|f| *f <= 7).ok_or_else(bad)?;
        Ok(Self {
            domain,
            bus: bus as u8,
            device: device as u8,
            function: function as u8,
        })
    }
}

impl fmt::Display for PciBusId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.domain > 0xffff {
            write!(f, "{:08x}", self.domain)?;
        } else {
            write!(f, "{:04x}", self.domain)?;
        }
        write!(
            f,
            ":{:02x}:{:02x}.{:x}",
            self.bus, self.device, self.function
        )
    }
}

impl PciBusId {
    /// The spelling NVML uses: 8-digit domain, upper-case hex (`00000000:3B:00.0`).
    pub fn nvml_form(&self) -> String {
        format!(
            "{:08X}:{:02X}:{:02X}.{:X}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

impl Serialize for PciBusId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PciBusId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Parse inside the string visitor so format errors carry the value's position.
        struct V;
        impl Visitor<'_> for V {
            type Value = PciBusId;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a PCI bus ID such as 0000:3b:00.0")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<PciBusId, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nvml_sysfs_and_lspci_spellings_are_the_same_address() {
        let a: PciBusId = "00000000:3B:00.0".parse().unwrap();
        let b: PciBusId = "0000:3b:00.0".parse().unwrap();
        let c: PciBusId = "3b:00.0".parse().unwrap();
        assert_eq!(a, b);
        assert_eq!(b, c);
        assert_eq!(a.to_string(), "0000:3b:00.0");
        assert_eq!(a.nvml_form(), "00000000:3B:00.0");
    }

    #[test]
    fn bus_ids_order_numerically_not_by_spelling() {
        let mut ids: Vec<PciBusId> = [
            "0000:db:00.0",
            "00000000:1A:00.0",
            "0001:05:00.0",
            "9a:00.0",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        ids.sort();
        let names: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
        assert_eq!(
            names,
            [
                "0000:1a:00.0",
                "0000:9a:00.0",
                "0000:db:00.0",
                "0001:05:00.0"
            ]
        );
    }

    #[test]
    fn malformed_bus_ids_are_rejected_with_the_expected_form() {
        for s in [
            "",
            "3b",
            "0000:3b:00",
            "0000:3b:20.0",
            "0000:3b:00.8",
            "0000:3g:00.0",
            "000000000:3b:00.0",
            "0000:3b:00.0.1",
        ] {
            let e = s.parse::<PciBusId>().unwrap_err().to_string();
            assert!(e.contains("0000:3b:00.0"), "{s}: {e}");
        }
    }

    #[test]
    fn wide_domains_keep_all_digits() {
        let id: PciBusId = "10000:01:00.0".parse().unwrap();
        assert_eq!(id.to_string(), "00010000:01:00.0");
    }
}
