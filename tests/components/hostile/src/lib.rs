//! A rule that attacks its sandbox on request: each event's `attack` field
//! picks the misbehaviour, so one component exercises every bound. Events
//! without an attack raise one `ok-N` alert each, proving the rule healthy.

use std::hint::black_box;
use std::sync::atomic::{AtomicU32, Ordering};

use tocsin_rule::{Alert, Context, Error, Events, Level, Manifest, Rule, json, log};

pub struct Hostile;

/// Calls this instance has served: lives in linear memory, so it starts
/// again at 1 whenever the host replaces the instance.
static CALLS: AtomicU32 = AtomicU32::new(0);

impl Rule for Hostile {
    type Params = ();
    type State = Vec<u8>;

    fn manifest((): &()) -> Manifest {
        Manifest::new("hostile", "0.1.0").fields(["attack", "spin"])
    }

    fn evaluate(
        (): &(),
        state: &mut Vec<u8>,
        events: Events<'_>,
        ctx: &mut Context<'_>,
    ) -> Result<(), Error> {
        let calls = CALLS.fetch_add(1, Ordering::Relaxed) + 1;
        for event in events.iter() {
            match event.str("attack").unwrap_or("none") {
                "loop" => {
                    let mut n = 0u64;
                    loop {
                        n = black_box(n.wrapping_add(1));
                    }
                }
                "memory" => {
                    let mut hoard = Vec::new();
                    loop {
                        hoard.push(black_box(vec![1u8; 1 << 20]));
                    }
                }
                "recursion" => {
                    black_box(recurse(black_box(1)));
                }
                "panic" => panic!("boom on purpose"),
                // Slow but legal: `spin` rounds of work (default 10⁶),
                // within the fuel of one call; ends healthy.
                "slow" => {
                    let rounds = event.i64("spin").unwrap_or(1_000_000).max(0) as u64;
                    let mut n = 0u64;
                    for i in 0..rounds {
                        n = black_box(n.wrapping_mul(31).wrapping_add(i));
                    }
                    ctx.emit(
                        Alert::firing(format!("slow-{}", event.index()), "slow")
                            .detail(json!({"n": n})),
                    );
                }
                // One more than the host's default bound.
                "alerts" => {
                    for n in 0..10_001 {
                        ctx.emit(Alert::firing(format!("flood-{n}"), "flood"));
                    }
                }
                // 5 MiB of title against the default 4 MiB.
                "alert-bytes" => ctx.emit(Alert::firing("huge", "x".repeat(5 << 20))),
                "log" => loop {
                    log(Level::Info, "spam spam spam spam spam spam spam spam");
                },
                "print" => loop {
                    println!("spam on stdout");
                },
                "state" => state.resize(512 << 10, 7),
                "fail" => return Err(Error::failed("refusing on purpose")),
                // Blames an event the batch does not have.
                "bad-index" => {
                    return Err(Error::BadEvent {
                        index: 999,
                        reason: "made up".to_owned(),
                    });
                }
                // Blocks the thread: the host must stop it, not wait.
                "sleep" => std::thread::sleep(std::time::Duration::from_secs(5)),
                // What the guest's clocks read.
                "clock" => {
                    let wall = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(-1, |d| d.as_millis() as i64);
                    let started = std::time::Instant::now();
                    black_box((0..10_000u64).sum::<u64>());
                    let elapsed = started.elapsed().as_nanos() as u64;
                    ctx.emit(
                        Alert::firing("clock", "what the clocks read").detail(
                            json!({"wall_ms": wall, "now": ctx.now(), "elapsed_ns": elapsed}),
                        ),
                    );
                }
                // What the guest's randomness yields: secure bytes, std's
                // hasher seed and a HashMap's iteration order.
                "random" => {
                    use std::hash::BuildHasher;
                    let mut bytes = [0u8; 16];
                    getrandom::fill(&mut bytes).map_err(|e| Error::failed(e.to_string()))?;
                    let hash = std::collections::hash_map::RandomState::new().hash_one("tocsin");
                    let order: Vec<u32> = (0..16u32)
                        .collect::<std::collections::HashSet<u32>>()
                        .into_iter()
                        .collect();
                    ctx.emit(
                        Alert::firing(format!("random-{}", event.index()), "what random yields")
                            .detail(json!({"bytes": bytes, "hash": hash, "order": order})),
                    );
                }
                "peek" => {
                    // What the sandbox lets a rule see of its host.
                    let env = std::env::vars().count();
                    let args = std::env::args().count();
                    let root = std::fs::read_dir("/").is_ok();
                    let file = std::fs::read("/etc/passwd").is_ok();
                    ctx.emit(Alert::firing("peek", "what the sandbox shows").detail(
                        json!({"env": env, "args": args, "root_dir": root, "etc_passwd": file}),
                    ));
                }
                _ => {
                    let n = state.len();
                    state.push(1);
                    ctx.emit(
                        Alert::firing(format!("ok-{n}"), "healthy")
                            .detail(json!({"instance_calls": calls})),
                    );
                }
            }
        }
        Ok(())
    }
}

fn recurse(depth: u64) -> u64 {
    let pad = black_box([depth; 16]);
    if black_box(depth) == 0 {
        return pad[0];
    }
    recurse(depth + 1).wrapping_add(pad[3])
}

tocsin_rule::export!(Hostile);
