//! A small `--key value` / `--key=value` / `--flag` parser (no dependencies beyond libc).

use crate::error::{Error, Result};

#[derive(Debug)]
pub struct Args {
    rest: Vec<String>,
}

impl Args {
    pub fn new(rest: Vec<String>) -> Args {
        Args { rest }
    }

    /// Remove a boolean `--name`.
    pub fn flag(&mut self, name: &str) -> bool {
        let key = format!("--{name}");
        let before = self.rest.len();
        self.rest.retain(|a| *a != key);
        self.rest.len() != before
    }

    /// Remove `--name V` or `--name=V`; the last occurrence wins.
    pub fn opt(&mut self, name: &str) -> Result<Option<String>> {
        let key = format!("--{name}");
        let prefix = format!("--{name}=");
        let mut found = None;
        let mut i = 0;
        while i < self.rest.len() {
            if self.rest[i] == key {
                if i + 1 >= self.rest.len() {
                    return Err(Error::Other(format!("{key} needs a value")));
                }
                found = Some(self.rest.remove(i + 1));
                self.rest.remove(i);
            } else if let Some(v) = self.rest[i].strip_prefix(&prefix) {
                found = Some(v.to_string());
                self.rest.remove(i);
            } else {
                i += 1;
            }
        }
        Ok(found)
    }

    pub fn required(&mut self, name: &str) -> Result<String> {
        self.opt(name)?
            .ok_or_else(|| Error::Other(format!("--{name} is required")))
    }

    pub fn num<T: std::str::FromStr>(&mut self, name: &str, default: T) -> Result<T> {
        match self.opt(name)? {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| Error::Other(format!("--{name}: not a number: {v:?}"))),
        }
    }

    pub fn bytes(&mut self, name: &str) -> Result<Option<u64>> {
        self.opt(name)?
            .map(|v| parse_bytes(&v).map_err(|e| Error::Other(format!("--{name}: {e}"))))
            .transpose()
    }

    /// What is left, in order (the command and its options, after the global options).
    pub fn into_rest(self) -> Vec<String> {
        self.rest
    }

    /// Fail on anything not consumed.
    pub fn finish(self) -> Result<()> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(Error::Other(format!(
                "unknown arguments: {}",
                self.rest.join(" ")
            )))
        }
    }
}

/// `8589934592`, `8GiB`, `8G` (= GiB), `256MiB`, `512K`.
pub fn parse_bytes(s: &str) -> std::result::Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("not a size: {s:?}"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" | "kb" => 1 << 10,
        "m" | "mib" | "mb" => 1 << 20,
        "g" | "gib" | "gb" => 1 << 30,
        "t" | "tib" | "tb" => 1 << 40,
        _ => return Err(format!("unknown unit in {s:?}")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size overflows: {s:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Args {
        Args::new(s.split_whitespace().map(String::from).collect())
    }

    #[test]
    fn options_flags_and_leftovers() {
        let mut a = args("--seconds 12 --shape=large --plain --depth 8");
        assert!(a.flag("plain"));
        assert!(!a.flag("plain"));
        assert_eq!(a.num("seconds", 0.0).unwrap(), 12.0);
        assert_eq!(a.opt("shape").unwrap().as_deref(), Some("large"));
        assert_eq!(a.num("missing", 5u32).unwrap(), 5);
        assert!(a.finish().unwrap_err().to_string().contains("--depth 8"));
    }

    #[test]
    fn errors_are_messages() {
        assert!(args("--seconds").opt("seconds").is_err());
        assert!(args("--seconds x").num("seconds", 1.0f64).is_err());
        assert!(args("")
            .required("out")
            .unwrap_err()
            .to_string()
            .contains("--out is required"));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("8GiB").unwrap(), 8 << 30);
        assert_eq!(parse_bytes("8G").unwrap(), 8 << 30);
        assert_eq!(parse_bytes("256MiB").unwrap(), 256 << 20);
        assert_eq!(parse_bytes("4096").unwrap(), 4096);
        assert!(parse_bytes("8X").is_err());
        assert!(parse_bytes("GiB").is_err());
        assert!(parse_bytes("99999999999999T").is_err());
    }
}
