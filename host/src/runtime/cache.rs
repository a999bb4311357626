//! Compiled components, keyed by the SHA-256 of the component bytes and the
//! engine's compatibility hash: in memory for this process, and on disk so a
//! restart does not compile again.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::PathBuf;
use std::sync::Mutex;

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

use super::error::Cause;

/// `$XDG_CACHE_HOME/tocsin/components`, else `~/.cache/tocsin/components`.
pub(crate) fn default_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))?;
    Some(base.join("tocsin").join("components"))
}

pub(crate) struct ComponentCache {
    engine: Engine,
    /// Hex of the engine's compatibility hash: artifacts of another wasmtime
    /// version or configuration are never loaded.
    engine_key: String,
    dir: Option<PathBuf>,
    compiled: Mutex<HashMap<String, Component>>,
}

impl ComponentCache {
    pub(crate) fn new(engine: &Engine, dir: Option<PathBuf>) -> Self {
        let mut hasher = DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        ComponentCache {
            engine: engine.clone(),
            engine_key: format!("{:016x}", hasher.finish()),
            dir,
            compiled: Mutex::new(HashMap::new()),
        }
    }

    /// The compiled component for these bytes and its content hash.
    pub(crate) fn compile(&self, wasm: &[u8]) -> Result<(Component, String), Cause> {
        let hash = hex::encode(Sha256::digest(wasm));
        if let Some(component) = self.get(&hash) {
            return Ok((component, hash));
        }
        let component = match self.load_artifact(&hash) {
            Some(component) => component,
            None => {
                let component = Component::new(&self.engine, wasm)
                    .map_err(|e| Cause::InvalidComponent(format!("{e:#}")))?;
                self.store_artifact(&hash, &component);
                component
            }
        };
        self.compiled
            .lock()
            .expect("component cache lock")
            .insert(hash.clone(), component.clone());
        Ok((component, hash))
    }

    pub(crate) fn get(&self, hash: &str) -> Option<Component> {
        self.compiled
            .lock()
            .expect("component cache lock")
            .get(hash)
            .cloned()
    }

    fn artifact_path(&self, hash: &str) -> Option<PathBuf> {
        Some(
            self.dir
                .as_ref()?
                .join(format!("{hash}-{}.cwasm", self.engine_key)),
        )
    }

    fn load_artifact(&self, hash: &str) -> Option<Component> {
        let path = self.artifact_path(hash)?;
        if !path.exists() {
            return None;
        }
        // SAFETY: the file is one this cache wrote with `Component::serialize`
        // for an engine with the same compatibility hash (it is in the name),
        // renamed into place only once complete.
        match unsafe { Component::deserialize_file(&self.engine, &path) } {
            Ok(component) => Some(component),
            Err(error) => {
                tracing::warn!(path = %path.display(), error = %format!("{error:#}"), "discarding unreadable compiled component");
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    fn store_artifact(&self, hash: &str, component: &Component) {
        let Some(path) = self.artifact_path(hash) else {
            return;
        };
        let write = || -> anyhow::Result<()> {
            let bytes = component
                .serialize()
                .map_err(|e| anyhow::anyhow!("{e:#}"))?;
            let dir = path.parent().expect("artifact path has a directory");
            std::fs::create_dir_all(dir)?;
            let tmp = tempfile::NamedTempFile::new_in(dir)?;
            std::fs::write(tmp.path(), bytes)?;
            tmp.persist(&path)?;
            Ok(())
        };
        // The cache only saves time: a failure to write it is not fatal.
        if let Err(error) = write() {
            tracing::warn!(path = %path.display(), %error, "cannot cache compiled component");
        }
    }
}
