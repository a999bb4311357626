//! `tocsin rule new NAME`: a rule crate that builds both ways
//! (`cargo build --release --target wasm32-wasip2`, `cargo component build
//! --release`), with a unit test and a sample events file on which
//! `tocsin rule test` raises an alert.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

const CARGO_TOML: &str = include_str!("scaffold/Cargo.toml.txt");
const LIB_RS: &str = include_str!("scaffold/lib.rs.txt");
const EVENTS: &str = include_str!("scaffold/events.ndjson.txt");
const README: &str = include_str!("scaffold/README.md.txt");

/// Where the SDK this binary was built with lives, if it is still there:
/// a crate made from a checkout of Tocsin uses that checkout's SDK.
fn bundled_sdk() -> Option<PathBuf> {
    let sdk = Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-sdk");
    sdk.join("Cargo.toml")
        .exists()
        .then(|| sdk.canonicalize().ok())
        .flatten()
}

/// Write the crate `name` into `dir` (which must not exist), with the SDK
/// from `sdk` (a path), else this checkout's, else crates.io. Returns what
/// was written.
pub fn create(name: &str, dir: &Path, sdk: Option<&Path>) -> anyhow::Result<Vec<PathBuf>> {
    if name.is_empty()
        || name.len() > 64
        || !name.starts_with(|c: char| c.is_ascii_lowercase())
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        bail!(
            "rule name `{name}` must start with a lowercase letter and be up to 64 lowercase letters, digits and `-`"
        );
    }
    if dir.exists() {
        bail!("{} exists: choose a new directory", dir.display());
    }
    let sdk = match sdk.map(Path::to_owned).or_else(bundled_sdk) {
        Some(path) => {
            let path = path
                .canonicalize()
                .with_context(|| format!("cannot find the SDK at {}", path.display()))?;
            if !path.join("Cargo.toml").exists() {
                bail!(
                    "{} is not the tocsin-rule crate (no Cargo.toml)",
                    path.display()
                );
            }
            format!(
                "tocsin-rule = {{ path = {:?} }}",
                path.display().to_string()
            )
        }
        None => format!("tocsin-rule = \"{}\"", env!("CARGO_PKG_VERSION")),
    };
    let type_name: String = name
        .split('-')
        .map(|part| {
            let mut chars = part.chars();
            chars.next().map_or(String::new(), |first| {
                first.to_ascii_uppercase().to_string() + chars.as_str()
            })
        })
        .collect();
    let fill = |template: &str| {
        template
            .replace("{{name}}", name)
            .replace("{{type}}", &type_name)
            .replace("{{file}}", &name.replace('-', "_"))
            .replace("{{sdk}}", &sdk)
    };
    let files = [
        (PathBuf::from("Cargo.toml"), fill(CARGO_TOML)),
        (PathBuf::from("src/lib.rs"), fill(LIB_RS)),
        (PathBuf::from("events.ndjson"), fill(EVENTS)),
        (PathBuf::from("README.md"), fill(README)),
    ];
    std::fs::create_dir_all(dir.join("src"))
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let mut written = Vec::new();
    for (file, text) in files {
        let path = dir.join(file);
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}
