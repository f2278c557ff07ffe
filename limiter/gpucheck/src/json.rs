//! One-line JSON output (a tiny builder) and a small parser for `summarize`.

use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::OnceLock;

/// Added to every line: `"tag"` (`--tag`) and `"pid"`.
static TAG: OnceLock<Option<String>> = OnceLock::new();

pub fn set_tag(tag: Option<String>) {
    let _ = TAG.set(tag);
}

/// A JSON value, as built for output or parsed back.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Num(f64),
    Str(String),
    Arr(Vec<Value>),
    Obj(Vec<(String, Value)>),
}

impl Value {
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Obj(kv) => kv.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }
    pub fn num(&self, key: &str) -> Option<f64> {
        match self.get(key)? {
            Value::Num(n) => Some(*n),
            _ => None,
        }
    }
    pub fn str(&self, key: &str) -> Option<&str> {
        match self.get(key)? {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn bool(&self, key: &str) -> Option<bool> {
        match self.get(key)? {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }
    pub fn arr(&self, key: &str) -> Option<&[Value]> {
        match self.get(key)? {
            Value::Arr(a) => Some(a),
            _ => None,
        }
    }

    fn write(&self, out: &mut String) {
        match self {
            Value::Null => out.push_str("null"),
            Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Value::Num(n) => write_num(out, *n),
            Value::Str(s) => write_str(out, s),
            Value::Arr(a) => {
                out.push('[');
                for (i, v) in a.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    v.write(out);
                }
                out.push(']');
            }
            Value::Obj(kv) => {
                out.push('{');
                for (i, (k, v)) in kv.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write_str(out, k);
                    out.push(':');
                    v.write(out);
                }
                out.push('}');
            }
        }
    }

    pub fn to_json(&self) -> String {
        let mut s = String::new();
        self.write(&mut s);
        s
    }
}

fn write_num(out: &mut String, n: f64) {
    if !n.is_finite() {
        out.push_str("null");
    } else if n.fract() == 0.0 && n.abs() < 9.0e15 {
        let _ = write!(out, "{}", n as i64);
    } else {
        // Enough digits for ratios and nanoseconds; trailing zeros trimmed.
        let s = format!("{n:.6}");
        let s = s.trim_end_matches('0').trim_end_matches('.');
        out.push_str(s);
    }
}

fn write_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

impl From<bool> for Value {
    fn from(b: bool) -> Self {
        Value::Bool(b)
    }
}
impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::Str(s.to_string())
    }
}
impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::Str(s)
    }
}
impl From<&String> for Value {
    fn from(s: &String) -> Self {
        Value::Str(s.clone())
    }
}
macro_rules! num_from {
    ($($t:ty),*) => {$(
        impl From<$t> for Value {
            fn from(n: $t) -> Self { Value::Num(n as f64) }
        }
    )*};
}
num_from!(u8, u16, u32, u64, usize, i32, i64, f32, f64);
impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(o: Option<T>) -> Self {
        o.map_or(Value::Null, Into::into)
    }
}
impl<T: Into<Value>> From<Vec<T>> for Value {
    fn from(v: Vec<T>) -> Self {
        Value::Arr(v.into_iter().map(Into::into).collect())
    }
}

/// An output line under construction; keys keep insertion order.
#[derive(Debug, Clone)]
pub struct Line(Vec<(String, Value)>);

impl Line {
    /// `{"check": check, ["tag": …,] "pid": …}`.
    pub fn new(check: &str) -> Line {
        let mut l = Line(vec![("check".into(), check.into())]);
        if let Some(Some(t)) = TAG.get() {
            l.0.push(("tag".into(), t.into()));
        }
        l.0.push(("pid".into(), std::process::id().into()));
        l
    }

    /// A line without tag or pid (for building nested objects).
    pub fn obj() -> Line {
        Line(Vec::new())
    }

    pub fn set(mut self, k: &str, v: impl Into<Value>) -> Line {
        self.put(k, v);
        self
    }

    pub fn put(&mut self, k: &str, v: impl Into<Value>) {
        let v = v.into();
        if let Some(slot) = self.0.iter_mut().find(|(key, _)| key == k) {
            slot.1 = v;
        } else {
            self.0.push((k.to_string(), v));
        }
    }

    pub fn value(self) -> Value {
        Value::Obj(self.0)
    }

    /// Print to stdout as one line and flush (so concurrent processes interleave by line).
    pub fn emit(self) {
        let mut s = self.value().to_json();
        s.push('\n');
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(s.as_bytes());
        let _ = out.flush();
    }
}

impl From<Line> for Value {
    fn from(l: Line) -> Self {
        l.value()
    }
}

/// Parse one JSON text (the lines gpucheck writes, and any other well-formed JSON).
pub fn parse(s: &str) -> Result<Value, String> {
    let mut p = Parser {
        b: s.as_bytes(),
        i: 0,
        depth: 0,
    };
    p.ws();
    let v = p.value()?;
    p.ws();
    if p.i != p.b.len() {
        return Err(format!("trailing characters at {}", p.i));
    }
    Ok(v)
}

struct Parser<'a> {
    b: &'a [u8],
    i: usize,
    depth: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }
    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }
    fn eat(&mut self, c: u8) -> Result<(), String> {
        if self.peek() == Some(c) {
            self.i += 1;
            Ok(())
        } else {
            Err(format!("expected {:?} at {}", c as char, self.i))
        }
    }
    fn lit(&mut self, word: &str, v: Value) -> Result<Value, String> {
        if self.b.get(self.i..self.i + word.len()) == Some(word.as_bytes()) {
            self.i += word.len();
            Ok(v)
        } else {
            Err(format!("bad literal at {}", self.i))
        }
    }
    fn value(&mut self) -> Result<Value, String> {
        if self.depth > 64 {
            return Err("nesting too deep".into());
        }
        match self.peek() {
            Some(b'{') => {
                self.depth += 1;
                self.i += 1;
                let mut kv = Vec::new();
                self.ws();
                if self.peek() == Some(b'}') {
                    self.i += 1;
                    self.depth -= 1;
                    return Ok(Value::Obj(kv));
                }
                loop {
                    self.ws();
                    let k = self.string()?;
                    self.ws();
                    self.eat(b':')?;
                    self.ws();
                    let v = self.value()?;
                    kv.push((k, v));
                    self.ws();
                    match self.peek() {
                        Some(b',') => self.i += 1,
                        Some(b'}') => {
                            self.i += 1;
                            self.depth -= 1;
                            return Ok(Value::Obj(kv));
                        }
                        _ => return Err(format!("expected , or }} at {}", self.i)),
                    }
                }
            }
            Some(b'[') => {
                self.depth += 1;
                self.i += 1;
                let mut a = Vec::new();
                self.ws();
                if self.peek() == Some(b']') {
                    self.i += 1;
                    self.depth -= 1;
                    return Ok(Value::Arr(a));
                }
                loop {
                    self.ws();
                    a.push(self.value()?);
                    self.ws();
                    match self.peek() {
                        Some(b',') => self.i += 1,
                        Some(b']') => {
                            self.i += 1;
                            self.depth -= 1;
                            return Ok(Value::Arr(a));
                        }
                        _ => return Err(format!("expected , or ] at {}", self.i)),
                    }
                }
            }
            Some(b'"') => self.string().map(Value::Str),
            Some(b't') => self.lit("true", Value::Bool(true)),
            Some(b'f') => self.lit("false", Value::Bool(false)),
            Some(b'n') => self.lit("null", Value::Null),
            Some(b'-' | b'0'..=b'9') => {
                let start = self.i;
                while matches!(
                    self.peek(),
                    Some(b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9')
                ) {
                    self.i += 1;
                }
                let t = std::str::from_utf8(&self.b[start..self.i]).map_err(|e| e.to_string())?;
                t.parse::<f64>()
                    .map(Value::Num)
                    .map_err(|_| format!("bad number {t:?}"))
            }
            _ => Err(format!("unexpected input at {}", self.i)),
        }
    }
    fn string(&mut self) -> Result<String, String> {
        self.eat(b'"')?;
        let mut out: Vec<u8> = Vec::new();
        loop {
            let Some(c) = self.peek() else {
                return Err("unterminated string".into());
            };
            self.i += 1;
            match c {
                b'"' => break,
                b'\\' => {
                    let Some(e) = self.peek() else {
                        return Err("unterminated escape".into());
                    };
                    self.i += 1;
                    match e {
                        b'"' => out.push(b'"'),
                        b'\\' => out.push(b'\\'),
                        b'/' => out.push(b'/'),
                        b'n' => out.push(b'\n'),
                        b'r' => out.push(b'\r'),
                        b't' => out.push(b'\t'),
                        b'b' => out.push(8),
                        b'f' => out.push(12),
                        b'u' => {
                            let hex = self.b.get(self.i..self.i + 4).ok_or("short \\u escape")?;
                            let hex = std::str::from_utf8(hex).map_err(|e| e.to_string())?;
                            let cp = u32::from_str_radix(hex, 16).map_err(|e| e.to_string())?;
                            self.i += 4;
                            let ch = char::from_u32(cp).unwrap_or('\u{fffd}');
                            let mut buf = [0u8; 4];
                            out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                        }
                        _ => return Err(format!("bad escape at {}", self.i)),
                    }
                }
                c => out.push(c),
            }
        }
        String::from_utf8(out).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_one_line_with_check_and_pid_first() {
        let l = Line::new("mem_cap")
            .set("cap_bytes", 8u64 << 30)
            .set("pass", true)
            .set("x", None::<u32>);
        let s = l.value().to_json();
        assert!(s.starts_with("{\"check\":\"mem_cap\","), "{s}");
        assert!(s.contains("\"cap_bytes\":8589934592"));
        assert!(s.contains("\"pass\":true"));
        assert!(s.contains("\"x\":null"));
        assert!(!s.contains('\n'));
    }

    #[test]
    fn numbers_are_integers_or_trimmed_decimals_and_never_nan() {
        let j = |n: f64| Value::Num(n).to_json();
        assert_eq!(j(3.0), "3");
        assert_eq!(j(0.25), "0.25");
        assert_eq!(j(1.0 / 3.0), "0.333333");
        assert_eq!(j(f64::NAN), "null");
        assert_eq!(j(f64::INFINITY), "null");
        assert_eq!(j(-2.5), "-2.5");
    }

    #[test]
    fn strings_are_escaped_and_round_trip() {
        let v = Line::obj()
            .set("e", "a \"quoted\"\\ line\nwith\ttab \u{1}")
            .value();
        let s = v.to_json();
        assert!(!s.contains('\n'));
        assert_eq!(parse(&s).unwrap(), v);
    }

    #[test]
    fn parses_nested_output_back() {
        let inner = Line::obj().set("pid", 7u32).set("sm_mean", 29.5);
        let v = Line::obj()
            .set("pids", vec![Value::from(inner)])
            .set("ok", false)
            .value();
        let back = parse(&v.to_json()).unwrap();
        assert_eq!(back, v);
        let pids = back.arr("pids").unwrap();
        assert_eq!(pids[0].num("sm_mean"), Some(29.5));
        assert_eq!(back.bool("ok"), Some(false));
    }

    #[test]
    fn rejects_garbage_without_panicking() {
        for bad in [
            "",
            "{",
            "{\"a\":}",
            "[1,",
            "\"abc",
            "{\"a\":1}x",
            "nul",
            "-",
            "{\"a\" 1}",
            "\"\\u12\"",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        let deep = "[".repeat(200);
        assert!(parse(&deep).is_err());
        assert_eq!(
            parse(" {\"a\": [1, 2.5e3, -4]} ")
                .unwrap()
                .arr("a")
                .unwrap()[1],
            Value::Num(2500.0)
        );
    }
}
