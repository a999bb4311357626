//! The one place the host generates bindings for `wit/rule.wit`.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "rule",
    imports: {
        // Logging past the log bound traps the guest.
        "tocsin:rule/host.log": trappable,
    },
});

pub use self::tocsin::rule::types::*;
