//! `tocsin rule new NAME`: a rule crate that builds both ways
//! (`cargo build --release --target wasm32-wasip2`, `cargo component build
//! --release`), with a unit test and a sample events file on which
//! `tocsin rule test` raises an alert.
//!
//! The crate stands alone: by default the SDK this binary carries (its
//! sources and the WIT contract, see `build.rs`) is written into the crate's
//! own `vendor/tocsin-rule`, so it builds with rustup and nothing else, can
//! be committed and moved, and no path in it points outside it. `--sdk PATH`
//! uses a local checkout of the SDK instead, `--sdk-version V` a registry
//! release.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

const CARGO_TOML: &str = include_str!("scaffold/Cargo.toml.txt");
const LIB_RS: &str = include_str!("scaffold/lib.rs.txt");
const EVENTS: &str = include_str!("scaffold/events.ndjson.txt");
const README: &str = include_str!("scaffold/README.md.txt");

/// The guest SDK carried in the binary: `(path inside the crate, text)`.
mod sdk {
    include!(concat!(env!("OUT_DIR"), "/sdk.rs"));
}

/// Where in a new crate the carried SDK goes.
pub const VENDORED_SDK: &str = "vendor/tocsin-rule";

/// Which SDK a new crate depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sdk {
    /// The copy this binary carries, written into the crate.
    Carried,
    /// A local checkout of the `tocsin-rule` crate.
    Path(PathBuf),
    /// A release of `tocsin-rule` from the crate registry.
    Version(String),
}

/// Names cargo or Rust refuse for a package (or that would shadow the SDK).
const RESERVED: &[&str] = &[
    "tocsin-rule",
    "test",
    "std",
    "core",
    "alloc",
    "proc-macro",
    "self",
    "super",
    "crate",
    "build",
    "deps",
    "examples",
    "incremental",
];

/// Why `name` cannot name a rule crate, if it cannot.
fn check_name(name: &str) -> anyhow::Result<()> {
    if name.is_empty()
        || name.len() > 64
        || !name.starts_with(|c: char| c.is_ascii_lowercase())
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        || name.ends_with('-')
        || name.contains("--")
    {
        bail!(
            "`{name}` is not a valid rule crate name: it must start with a lowercase letter and be up to 64 lowercase letters, digits and single `-` (not at the end)"
        );
    }
    if RESERVED.contains(&name) {
        bail!("`{name}` is not a valid rule crate name: cargo or Rust reserves it");
    }
    Ok(())
}

/// Write the crate `name` into `dir` (which must not exist, or be an empty
/// directory) with the SDK `sdk`. Returns what was written.
pub fn create(name: &str, dir: &Path, sdk: &Sdk) -> anyhow::Result<Vec<PathBuf>> {
    check_name(name)?;
    if dir.exists() {
        if !dir.is_dir() {
            bail!("{} exists and is not a directory", dir.display());
        }
        let mut entries =
            std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))?;
        if entries.next().is_some() {
            bail!(
                "{} is not empty: give a new or empty directory",
                dir.display()
            );
        }
    }
    let dependency = match sdk {
        Sdk::Carried => format!("tocsin-rule = {{ path = {VENDORED_SDK:?} }}"),
        Sdk::Path(path) => {
            let path = path
                .canonicalize()
                .with_context(|| format!("cannot find the SDK at {}", path.display()))?;
            let manifest = std::fs::read_to_string(path.join("Cargo.toml")).unwrap_or_default();
            if !manifest.contains("name = \"tocsin-rule\"") {
                bail!("{} is not the tocsin-rule crate", path.display());
            }
            format!(
                "tocsin-rule = {{ path = {:?} }}",
                path.display().to_string()
            )
        }
        Sdk::Version(version) => {
            if version.is_empty()
                || !version
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || ".-+^~=<>*, ".contains(c))
            {
                bail!("`{version}` is not a version requirement");
            }
            format!("tocsin-rule = {version:?}")
        }
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
            .replace("{{sdk}}", &dependency)
    };
    let mut files = vec![
        (PathBuf::from("Cargo.toml"), fill(CARGO_TOML)),
        (PathBuf::from("src/lib.rs"), fill(LIB_RS)),
        (PathBuf::from("events.ndjson"), fill(EVENTS)),
        (PathBuf::from("README.md"), fill(README)),
    ];
    if *sdk == Sdk::Carried {
        for (path, text) in sdk::FILES {
            files.push((Path::new(VENDORED_SDK).join(path), (*text).to_owned()));
        }
    }
    let mut written = Vec::new();
    for (file, text) in files {
        let path = dir.join(file);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_carried_sdk_has_its_manifest_sources_and_contract() {
        let paths: Vec<&str> = sdk::FILES.iter().map(|(path, _)| *path).collect();
        for path in ["Cargo.toml", "README.md", "src/lib.rs", "wit/rule.wit"] {
            assert!(paths.contains(&path), "{path} missing from {paths:?}");
        }
        let manifest = sdk::FILES[paths.iter().position(|p| *p == "Cargo.toml").unwrap()].1;
        assert!(
            !manifest.contains("workspace = true"),
            "inherits from a workspace it will not be in:\n{manifest}"
        );
        assert!(!manifest.contains("path ="), "{manifest}");
    }

    #[test]
    fn names_and_directories_are_checked_before_anything_is_written() {
        let dir = tempfile::tempdir().unwrap();
        for bad in [
            "My-Rule",
            "1rule",
            "rule_x",
            "rule-",
            "a--b",
            "",
            "test",
            "tocsin-rule",
        ] {
            let error = create(bad, &dir.path().join("x"), &Sdk::Carried).unwrap_err();
            assert!(
                error
                    .to_string()
                    .contains(&format!("`{bad}` is not a valid rule crate name")),
                "{error}"
            );
        }
        std::fs::write(dir.path().join("file"), "").unwrap();
        let error = create("ok", dir.path(), &Sdk::Carried).unwrap_err();
        assert_eq!(
            error.to_string(),
            format!(
                "{} is not empty: give a new or empty directory",
                dir.path().display()
            )
        );
        let empty = dir.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        create("ok", &empty, &Sdk::Carried).unwrap();
        assert!(empty.join("vendor/tocsin-rule/wit/rule.wit").exists());
    }
}
