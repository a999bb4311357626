#![doc = include_str!("../README.md")]

#[doc(hidden)]
pub mod abi;
#[cfg(any(
    test,
    all(
        feature = "allocator",
        target_arch = "wasm32",
        not(target_feature = "atomics")
    )
))]
mod alloc;
mod context;
mod event;
mod json;
pub mod lifecycle;
mod manifest;
mod mem;
mod params;
mod state;
pub mod testing;
mod times;
pub mod windows;

pub use context::{Alert, Context, Error, Severity};
pub use event::{Event, Events, Field};
pub use manifest::{Literal, Manifest};
pub use params::{duration, format_duration};
pub use serde_json::json;
pub use state::OldState;
pub use times::parse_time;

use serde::{Serialize, de::DeserializeOwned};

#[cfg(all(
    feature = "allocator",
    target_arch = "wasm32",
    not(target_feature = "atomics")
))]
#[global_allocator]
static ALLOCATOR: alloc::RuleAllocator = alloc::RuleAllocator::new();

/// An alert rule: a plain type, its parameters, its state, and what it does
/// with events.
///
/// Make it a component with [`export!`].
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a Tocsin rule",
    label = "`tocsin_rule::export!` needs a type implementing `tocsin_rule::Rule`",
    note = "add `impl tocsin_rule::Rule for {Self} {{ type Params = ...; type State = ...; fn manifest(...) ...; fn evaluate(...) ... }}`"
)]
pub trait Rule {
    /// How the rule is configured: read once per instance from the JSON the
    /// operator gives (`Default` when none is given), then handed to every
    /// call. `()` for a rule without parameters. Derive `Deserialize` with
    /// `#[serde(default, deny_unknown_fields)]` so that a tenant's typo is an
    /// error naming the field, not a silently ignored key.
    type Params: DeserializeOwned + Default;

    /// What the rule remembers per bucket between batches. Starts at
    /// `Default`; a state equal to its default is not stored at all.
    type State: Serialize + DeserializeOwned + Default;

    /// Name, version, filter, bucket key and fields, from the parameters.
    /// Called once per instance, before any other call.
    fn manifest(params: &Self::Params) -> Manifest;

    /// Called once per bucket per batch with that bucket's events in order.
    fn evaluate(
        params: &Self::Params,
        state: &mut Self::State,
        events: Events<'_>,
        ctx: &mut Context<'_>,
    ) -> Result<(), Error>;

    /// Called when a timer set with [`Context::set_timer`] is due.
    fn on_timer(
        params: &Self::Params,
        state: &mut Self::State,
        ctx: &mut Context<'_>,
    ) -> Result<(), Error> {
        let _ = (params, state, ctx);
        Ok(())
    }

    /// Read a state an earlier version stored under an older
    /// [`state_schema`](Manifest::state_schema) (only called when the
    /// manifest's schema is newer and it does not declare
    /// [`reset_older_state`](Manifest::reset_older_state)). The default
    /// refuses: the host keeps the bucket's state and rejects its events
    /// with an error naming both versions, until a version that can read
    /// it is active.
    ///
    /// ```
    /// # use tocsin_rule::{Context, Error, Events, Manifest, OldState, Rule};
    /// # struct Counter;
    /// #[derive(Default, serde::Serialize, serde::Deserialize)]
    /// struct State { count: u64, last: String }
    ///
    /// impl Rule for Counter {
    ///     type Params = ();
    ///     type State = State;
    ///     fn manifest((): &()) -> Manifest {
    ///         Manifest::new("counter", "2.0.0").state_schema(2)
    ///     }
    ///     fn upgrade_state((): &(), old: OldState<'_>) -> Result<State, String> {
    ///         // Schema 1 stored the count alone.
    ///         Ok(State { count: old.decode::<u64>()?, last: String::new() })
    ///     }
    /// #   fn evaluate((): &(), _: &mut State, _: Events<'_>, _: &mut Context<'_>) -> Result<(), Error> { Ok(()) }
    /// }
    /// ```
    fn upgrade_state(params: &Self::Params, old: OldState<'_>) -> Result<Self::State, String> {
        let _ = params;
        Err(format!(
            "this version does not upgrade states of schema {}",
            old.schema()
        ))
    }
}

/// A message for the rule's log, which the host keeps per rule and bounds.
pub fn log(level: Level, message: &str) {
    #[cfg(target_arch = "wasm32")]
    crate::bindings::tocsin::rule::host::log(level.into_abi(), message);
    #[cfg(not(target_arch = "wasm32"))]
    eprintln!("[{level:?}] {message}");
}

/// Log levels, as the host's log records them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

impl Level {
    #[cfg(target_arch = "wasm32")]
    fn into_abi(self) -> abi::Level {
        match self {
            Level::Trace => abi::Level::Trace,
            Level::Debug => abi::Level::Debug,
            Level::Info => abi::Level::Info,
            Level::Warn => abi::Level::Warn,
            Level::Error => abi::Level::Error,
        }
    }
}

/// Makes a [`Rule`] type the component's implementation of the
/// `tocsin:rule` world. Use it once per crate:
///
/// ```ignore
/// tocsin_rule::export!(MyRule);
/// ```
#[macro_export]
macro_rules! export {
    ($rule:ty) => {
        const _: () = {
            fn assert_rule<R: $crate::Rule>() {}
            let _ = assert_rule::<$rule>;
        };

        #[cfg(target_arch = "wasm32")]
        const _: () = {
            struct TocsinRuleExport;

            ::std::thread_local! {
                static PREPARED: ::std::cell::OnceCell<
                    &'static $crate::__private::Prepared<$rule>,
                > = const { ::std::cell::OnceCell::new() };
            }

            fn prepared() -> ::std::option::Option<&'static $crate::__private::Prepared<$rule>> {
                PREPARED.with(|prepared| prepared.get().copied())
            }

            impl $crate::bindings::Guest for TocsinRuleExport {
                fn manifest(
                    params: ::std::string::String,
                ) -> ::std::result::Result<
                    $crate::bindings::tocsin::rule::types::Manifest,
                    ::std::string::String,
                > {
                    $crate::__private::install_panic_hook();
                    let (prepared, manifest) = $crate::__private::prepare::<$rule>(&params)?;
                    let prepared: &'static _ =
                        ::std::boxed::Box::leak(::std::boxed::Box::new(prepared));
                    PREPARED
                        .with(|slot| slot.set(prepared))
                        .map_err(|_| "manifest was called twice on one instance".to_owned())?;
                    Ok(manifest.into_abi())
                }

                fn evaluate(
                    bucket: ::std::string::String,
                    state: ::std::option::Option<::std::vec::Vec<u8>>,
                    events: $crate::bindings::tocsin::rule::types::EventBatch,
                    now: i64,
                ) -> ::std::result::Result<
                    $crate::bindings::tocsin::rule::types::Outcome,
                    $crate::bindings::tocsin::rule::types::RuleError,
                > {
                    $crate::__private::install_panic_hook();
                    $crate::__private::evaluate::<$rule>(
                        prepared().ok_or_else($crate::__private::unprepared)?,
                        &bucket,
                        state.as_deref(),
                        &events,
                        now,
                    )
                }

                fn on_timer(
                    bucket: ::std::string::String,
                    state: ::std::option::Option<::std::vec::Vec<u8>>,
                    now: i64,
                ) -> ::std::result::Result<
                    $crate::bindings::tocsin::rule::types::Outcome,
                    $crate::bindings::tocsin::rule::types::RuleError,
                > {
                    $crate::__private::install_panic_hook();
                    $crate::__private::on_timer::<$rule>(
                        prepared().ok_or_else($crate::__private::unprepared)?,
                        &bucket,
                        state.as_deref(),
                        now,
                    )
                }
            }

    $crate::bindings::export_rule_world!(TocsinRuleExport with_types_in $crate::bindings);
        };
    };
}

#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "wit",
        world: "rule",
        pub_export_macro: true,
        export_macro_name: "export_rule_world",
        default_bindings_module: "tocsin_rule::bindings",
    });
}

/// The glue between the WIT calls and a [`Rule`]; shared by the component
/// export and the native harness so both run the same code.
#[doc(hidden)]
pub mod __private {
    pub use crate::abi;
    use crate::{Context, Events, Rule, state};

    /// What the glue computes once per instance: the parameters, the
    /// declared fields and the encoding of the default state.
    pub struct Prepared<R: Rule> {
        params: R::Params,
        fields: Vec<String>,
        codec: state::Codec,
        default_state: Vec<u8>,
    }

    impl<R: Rule> Prepared<R> {
        pub fn params(&self) -> &R::Params {
            &self.params
        }

        pub(crate) fn decode_state(&self, stored: Option<&[u8]>) -> Result<R::State, String> {
            self.codec
                .decode(stored, |old| R::upgrade_state(&self.params, old))
        }
    }

    /// Read the parameters (JSON text; `null` for none) and the manifest
    /// they give. A parameter the rule cannot take is an error naming it.
    pub fn prepare<R: Rule>(params: &str) -> Result<(Prepared<R>, crate::Manifest), String> {
        let params: R::Params = if params.trim() == "null" {
            R::Params::default()
        } else {
            let mut json = serde_json::Deserializer::from_str(params);
            serde_path_to_error::deserialize(&mut json).map_err(|e| {
                let path = e.path().to_string();
                let inner = e.into_inner();
                // The position is within text the host wrote, not the
                // operator's: the path says where.
                let position = format!(" at line {} column {}", inner.line(), inner.column());
                let message = inner.to_string();
                let message = message.strip_suffix(&position).unwrap_or(&message);
                if path == "." {
                    message.to_owned()
                } else {
                    format!("`{path}`: {message}")
                }
            })?
        };
        Ok(prepared(params))
    }

    /// [`prepare`] from parameters already read.
    pub fn prepared<R: Rule>(params: R::Params) -> (Prepared<R>, crate::Manifest) {
        let manifest = R::manifest(&params);
        let codec = manifest.state_codec();
        let prepared = Prepared {
            params,
            fields: manifest.field_names().to_vec(),
            default_state: codec
                .encode(&R::State::default())
                .expect("the default state encodes"),
            codec,
        };
        (prepared, manifest)
    }

    /// The failure of a call made before `manifest`.
    pub fn unprepared() -> abi::RuleError {
        abi::RuleError::Failed("the host called the rule before its manifest".to_owned())
    }

    pub fn evaluate<R: Rule>(
        prepared: &Prepared<R>,
        bucket: &str,
        stored: Option<&[u8]>,
        batch: &abi::EventBatch,
        now: i64,
    ) -> Result<abi::Outcome, abi::RuleError> {
        let mut state = prepared
            .decode_state(stored)
            .map_err(abi::RuleError::BadState)?;
        let mut ctx = Context::new(bucket, now);
        let events = Events::new(batch, &prepared.fields).map_err(abi::RuleError::Failed)?;
        R::evaluate(&prepared.params, &mut state, events, &mut ctx).map_err(|e| e.into_abi())?;
        finish(prepared, &state, stored, ctx)
    }

    pub fn on_timer<R: Rule>(
        prepared: &Prepared<R>,
        bucket: &str,
        stored: Option<&[u8]>,
        now: i64,
    ) -> Result<abi::Outcome, abi::RuleError> {
        let mut state = prepared
            .decode_state(stored)
            .map_err(abi::RuleError::BadState)?;
        let mut ctx = Context::new(bucket, now);
        R::on_timer(&prepared.params, &mut state, &mut ctx).map_err(|e| e.into_abi())?;
        finish(prepared, &state, stored, ctx)
    }

    fn finish<R: Rule>(
        prepared: &Prepared<R>,
        state: &R::State,
        stored: Option<&[u8]>,
        ctx: Context<'_>,
    ) -> Result<abi::Outcome, abi::RuleError> {
        let change = if ctx.deletes() {
            deletion(stored)
        } else {
            let bytes = prepared
                .codec
                .encode(state)
                .map_err(abi::RuleError::Failed)?;
            if Some(bytes.as_slice()) == stored {
                abi::StateChange::Unchanged
            } else if bytes == prepared.default_state {
                deletion(stored)
            } else {
                abi::StateChange::Set(bytes)
            }
        };
        Ok(abi::Outcome {
            state: change,
            timer: ctx.timer(),
            alerts: ctx.alerts,
        })
    }

    fn deletion(stored: Option<&[u8]>) -> abi::StateChange {
        match stored {
            Some(_) => abi::StateChange::Delete,
            None => abi::StateChange::Unchanged,
        }
    }

    /// Routes panic messages to the rule log at error level, so a panic is
    /// readable even in a component without WASI stderr.
    pub fn install_panic_hook() {
        #[cfg(target_arch = "wasm32")]
        {
            static ONCE: std::sync::Once = std::sync::Once::new();
            ONCE.call_once(|| {
                std::panic::set_hook(Box::new(|info| {
                    crate::log(crate::Level::Error, &format!("rule panicked: {info}"));
                }));
            });
        }
    }
}
