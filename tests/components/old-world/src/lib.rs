//! A rule component of the previous contract, `tocsin:rule@0.1.0` (its
//! manifest took no parameters), written against that world's WIT directly.
//! The host must refuse it at load, naming both versions.

#[cfg(target_arch = "wasm32")]
mod component {
    wit_bindgen::generate!({
        inline: "
            package tocsin:rule@0.1.0;
            interface types {
                record manifest { name: string, version: string }
            }
            world rule {
                use types.{manifest};
                export manifest: func() -> manifest;
            }
        ",
        world: "rule",
    });

    struct OldRule;

    impl Guest for OldRule {
        fn manifest() -> tocsin::rule::types::Manifest {
            tocsin::rule::types::Manifest {
                name: "old-world".to_owned(),
                version: "0.1.0".to_owned(),
            }
        }
    }

    export!(OldRule);
}
