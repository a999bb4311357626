//! The one place the host generates bindings for `wit/rule.wit`.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "rule",
    imports: {
        // Emitting past the output bounds traps the guest.
        "tocsin:rule/host.emit-alert": trappable,
        "tocsin:rule/host.log": trappable,
    },
});

pub use self::tocsin::rule::types::*;
