//! `write-config`: the binary `vcuda.cfg` for the preloaded runs, through the same encoder
//! gpu-manager uses (`gm_limiter_core::config`).

use gm_limiter_core::config::{CardLimit, Config, Mode};

use crate::args::Args;
use crate::error::{Error, Result};
use crate::json::Line;

pub fn run(mut a: Args) -> Result<()> {
    let out = a.required("out")?;
    let uuid = a.required("uuid")?;
    let cores: u32 = a.num("cores", 0u32)?;
    let mode = match a.opt("mode")?.as_deref().unwrap_or("hard") {
        "hard" => Mode::Hard,
        "soft" => Mode::Soft,
        m => {
            return Err(Error::Other(format!(
                "--mode must be hard or soft, not {m:?}"
            )))
        }
    };
    let core_limit: u32 = a.num("core-limit", if mode == Mode::Hard { cores } else { 100 })?;
    let memory = a
        .bytes("memory-bytes")?
        .ok_or_else(|| Error::Other("--memory-bytes is required".into()))?;
    let index: u32 = a.num("index", 0u32)?;
    let minor: u32 = a.num("minor", 0u32)?;
    a.finish()?;

    let cfg = Config {
        mode,
        incomplete: false,
        pod_uid: "gpucheck".to_string(),
        namespace: "gpucheck".to_string(),
        container: format!("gpucheck-{cores}"),
        cards: vec![CardLimit {
            index,
            minor,
            uuid: uuid.clone(),
            cores,
            core_limit,
            memory_limit: memory,
        }],
    };
    let bytes = cfg
        .encode()
        .map_err(|e| Error::Other(format!("config not encodable: {e}")))?;
    std::fs::write(&out, &bytes).map_err(|e| Error::Other(format!("writing {out}: {e}")))?;
    Line::new("write_config")
        .set("out", out)
        .set("uuid", uuid)
        .set("index", index)
        .set("minor", minor)
        .set("mode", if mode == Mode::Hard { "hard" } else { "soft" })
        .set("cores", cores)
        .set("core_limit", core_limit)
        .set("memory_bytes", memory)
        .set("size", bytes.len())
        .emit();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Args {
        Args::new(s.split_whitespace().map(String::from).collect())
    }

    #[test]
    fn writes_a_config_the_limiter_decodes() {
        let dir = std::env::temp_dir().join(format!("gpucheck-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("vcuda.cfg");
        let uuid = "GPU-12345678-1234-1234-1234-123456789abc";
        run(args(&format!(
            "--out {} --uuid {uuid} --cores 30 --memory-bytes 8GiB --minor 2",
            out.display()
        )))
        .unwrap();
        let back = Config::decode(&std::fs::read(&out).unwrap()).unwrap();
        assert_eq!(back.mode, Mode::Hard);
        assert_eq!(back.cards.len(), 1);
        let c = &back.cards[0];
        assert_eq!(
            (c.index, c.minor, c.cores, c.core_limit, c.memory_limit),
            (0, 2, 30, 30, 8 << 30)
        );
        assert_eq!(c.uuid, uuid);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn invalid_limits_are_errors() {
        let e = run(args(
            "--out /nonexistent/x --uuid GPU-1 --cores 0 --memory-bytes 1G",
        ))
        .unwrap_err();
        assert!(e.to_string().contains("config not encodable"), "{e}");
        let e = run(args(
            "--out /x --uuid GPU-1 --cores 30 --core-limit 50 --memory-bytes 1G",
        ))
        .unwrap_err();
        assert!(e.to_string().contains("config not encodable"), "{e}");
        assert!(run(args("--uuid GPU-1 --cores 30 --memory-bytes 1G")).is_err());
    }
}
