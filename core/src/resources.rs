//! Resource names and units of the resource contract (DESIGN §1).

use std::fmt;

/// vcuda-core units in one whole card.
pub const CORES_PER_CARD: u32 = 100;
/// Size of one vcuda-memory block in MiB.
pub const BLOCK_MIB: u64 = 256;
/// Size of one vcuda-memory block in bytes.
pub const BLOCK_BYTES: u64 = BLOCK_MIB * 1024 * 1024;
/// The default resource domain, compatible with TKEStack.
pub const DEFAULT_DOMAIN: &str = "tencent.com";

/// Number of whole memory blocks on a card of `memory_mib` MiB.
pub fn blocks_for_mib(memory_mib: u64) -> u32 {
    u32::try_from(memory_mib / BLOCK_MIB).unwrap_or(u32::MAX)
}

/// A resource domain was not a valid DNS subdomain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid resource domain {domain:?}: {reason}; use a DNS subdomain such as \"tencent.com\""
)]
pub struct DomainError {
    pub domain: String,
    pub reason: &'static str,
}

/// The two extended resource names under one domain, e.g. `tencent.com/vcuda-core`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ResourceNames {
    domain: String,
    core: String,
    memory: String,
}

impl fmt::Debug for ResourceNames {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResourceNames")
            .field("domain", &self.domain)
            .finish()
    }
}

impl Default for ResourceNames {
    fn default() -> Self {
        Self::from_valid_domain(DEFAULT_DOMAIN)
    }
}

impl ResourceNames {
    /// Resource names under `domain`. The domain must be a DNS subdomain (RFC 1123), at most
    /// 253 characters, and must not be a `kubernetes.io` domain (the kubelet rejects those for
    /// extended resources).
    pub fn new(domain: &str) -> Result<Self, DomainError> {
        validate_domain(domain)?;
        Ok(Self::from_valid_domain(domain))
    }

    fn from_valid_domain(domain: &str) -> Self {
        Self {
            domain: domain.to_string(),
            core: format!("{domain}/vcuda-core"),
            memory: format!("{domain}/vcuda-memory"),
        }
    }

    pub fn domain(&self) -> &str {
        &self.domain
    }
    /// `<domain>/vcuda-core`
    pub fn core(&self) -> &str {
        &self.core
    }
    /// `<domain>/vcuda-memory`
    pub fn memory(&self) -> &str {
        &self.memory
    }
}

fn validate_domain(domain: &str) -> Result<(), DomainError> {
    let err = |reason| {
        Err(DomainError {
            domain: domain.to_string(),
            reason,
        })
    };
    if domain.is_empty() {
        return err("it is empty");
    }
    if domain.len() > 253 {
        return err("it is longer than 253 characters");
    }
    if domain == "kubernetes.io" || domain.ends_with(".kubernetes.io") {
        return err("kubernetes.io domains are reserved and the kubelet rejects them");
    }
    for label in domain.split('.') {
        if label.is_empty() || label.len() > 63 {
            return err("every dot-separated label must be 1-63 characters");
        }
        let bytes = label.as_bytes();
        let ok_char = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-';
        if !bytes.iter().all(ok_char) {
            return err("only lowercase letters, digits, '-' and '.' are allowed");
        }
        if bytes[0] == b'-' || bytes[bytes.len() - 1] == b'-' {
            return err("labels must start and end with a letter or digit");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_names_are_tkestack_compatible() {
        let n = ResourceNames::default();
        assert_eq!(n.core(), "tencent.com/vcuda-core");
        assert_eq!(n.memory(), "tencent.com/vcuda-memory");
    }

    #[test]
    fn custom_domain_changes_both_names() {
        let n = ResourceNames::new("gpu.example.org").unwrap();
        assert_eq!(n.core(), "gpu.example.org/vcuda-core");
        assert_eq!(n.memory(), "gpu.example.org/vcuda-memory");
    }

    #[test]
    fn invalid_domains_are_rejected_with_the_rule() {
        for bad in [
            "",
            "Tencent.com",
            "a..b",
            "-a.com",
            "x.kubernetes.io",
            "a_b.com",
        ] {
            let e = ResourceNames::new(bad).unwrap_err();
            assert!(e.to_string().contains("DNS subdomain"), "{e}");
        }
    }

    #[test]
    fn blocks_are_floored_per_card() {
        assert_eq!(blocks_for_mib(16384), 64);
        assert_eq!(blocks_for_mib(15109), 59);
        assert_eq!(blocks_for_mib(255), 0);
    }
}
