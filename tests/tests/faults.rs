//! The seeded fault harness (see `grapevine_tests::faults`): schedules of single faults drawn
//! from seeds, run against 3- and 5-member in-process clusters under concurrent writers (single
//! faults, flapping links, repeated split/heal cycles; the map's merge policy drawn per seed), each
//! history checked for lost acknowledged writes, disagreement and panics.
//!
//! `GRAPEVINE_HARNESS_SEEDS` (default 200) schedules from `GRAPEVINE_HARNESS_FIRST_SEED`
//! (default 1) run, `GRAPEVINE_HARNESS_PARALLEL` (default 4) at a time; `GRAPEVINE_HARNESS_SEED`
//! replays a single one. `scripts/faults.sh` runs thousands. `GRAPEVINE_HARNESS_OBSERVED=1` also
//! checks what every acknowledged change replaced (see `faults::check_observed`; not yet in CI:
//! it finds losses that are still open, see issue 8's notes).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use grapevine_tests::faults::{Schedule, run};

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v.parse().unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

#[test]
fn seeded_fault_schedules_lose_no_acknowledged_write() {
    grapevine_tests::init_logging();
    // Panics on member threads do not fail a test by themselves: count them.
    static PANICS: AtomicUsize = AtomicUsize::new(0);
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        default_hook(info);
    }));
    let seeds: Vec<u64> = match std::env::var("GRAPEVINE_HARNESS_SEED") {
        Ok(seed) => vec![seed.parse().expect("GRAPEVINE_HARNESS_SEED is a number")],
        Err(_) => {
            let first = env_u64("GRAPEVINE_HARNESS_FIRST_SEED", 1);
            (first..first + env_u64("GRAPEVINE_HARNESS_SEEDS", 200)).collect()
        }
    };
    let parallel = env_u64("GRAPEVINE_HARNESS_PARALLEL", 4).max(1) as usize;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let started = std::time::Instant::now();
    let (reports, failures) = runtime.block_on(async move {
        let permits = Arc::new(tokio::sync::Semaphore::new(parallel));
        let mut runs = tokio::task::JoinSet::new();
        for seed in seeds {
            let permit = permits.clone().acquire_owned().await.unwrap();
            runs.spawn(async move {
                let outcome = run(Schedule::from_seed(seed)).await;
                drop(permit);
                outcome
            });
        }
        let (mut reports, mut failures) = (Vec::new(), Vec::new());
        while let Some(joined) = runs.join_next().await {
            match joined {
                Ok(Ok(report)) => reports.push(report),
                Ok(Err(failure)) => failures.push(failure),
                Err(e) => failures.push(format!("a run panicked: {e}")),
            }
        }
        (reports, failures)
    });
    let ops: usize = reports.iter().map(|r| r.ops).sum();
    let acknowledged: usize = reports.iter().map(|r| r.acknowledged).sum();
    let minority: usize = reports.iter().map(|r| r.minority_losses).sum();
    eprintln!(
        "fault harness: {} schedules passed, {} failed, in {:?}; {ops} operations, {acknowledged} acknowledged, \
         {minority} keys lost a minority side's acknowledged write or had a merge of one replace later changes (allowed: see faults::Model)",
        reports.len(),
        failures.len(),
        started.elapsed()
    );
    assert!(failures.is_empty(), "{} schedules failed:\n\n{}", failures.len(), failures.join("\n\n"));
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "a member panicked (see the output above)");
}
