//! AES-GCM throughput per core, as the migration stream uses it: AWS-LC (the stream's
//! library, `migration::seal`) beside ring (what the stream used before; rustls still
//! runs on it), and AEGIS-128L and AEGIS-128X4 (the `aegis` crate; an IRTF CFRG draft
//! the stream does not use) for what a faster AEAD would save.
//!
//! `cargo bench -p berth-hypervisor --bench aead` (release profile: AWS-LC at opt-level
//! 3, so its AVX-512 code is in). Each line is the CPU time of this thread
//! (`CLOCK_THREAD_CPUTIME_ID`, which waiting for a core does not inflate) to process
//! 200 MiB in 256 KiB runs, the minimum of 5 rounds:
//! - "in cache": the same 256 KiB again and again (the cipher's own speed);
//! - "from 200 MiB": 200 MiB of random bytes (far beyond the 2 MiB L2 cache) read once
//!   per round, as the sender reads
//!   guest pages (copied out first, then sealed in place, as the stream did before; or
//!   sealed straight into the send buffer, as it does now), and as the receiver opens
//!   pages the kernel wrote into guest memory.

use std::hint::black_box;
use std::time::Duration;

use aws_lc_rs::aead as lc;
use berth_hypervisor::host::sysinfo::thread_cpu_time;
use berth_hypervisor::migration::seal::{SealingKey, SharedBytes};
use ring::aead as rg;

const RUN: usize = 256 << 10;
const TOTAL: usize = 200 << 20;
const ROUNDS: usize = 5;

fn nonce(i: usize) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&(i as u64).to_be_bytes());
    n
}

/// CPU time of this thread spent in `f`.
fn timed(f: impl FnOnce()) -> Duration {
    let t = thread_cpu_time();
    f();
    thread_cpu_time() - t
}

/// Prints the fastest of [`ROUNDS`] rounds; `round` does its setup and returns the time
/// of the part measured.
fn measure(what: &str, mut round: impl FnMut() -> Duration) {
    let best = (0..ROUNDS).map(|_| round()).min().expect("rounds");
    let ms = best.as_secs_f64() * 1000.0;
    println!(
        "| {what} | {ms:.1} | {:.1} |",
        TOTAL as f64 / best.as_secs_f64() / 1e9
    );
}

fn main() {
    let key = [7u8; 16];
    let aws = SealingKey::new(&key);
    let aws_open = lc::LessSafeKey::new(lc::UnboundKey::new(&lc::AES_128_GCM, &key).unwrap());
    let ring = rg::LessSafeKey::new(rg::UnboundKey::new(&rg::AES_128_GCM, &key).unwrap());
    let mut memory = vec![0u8; TOTAL];
    getrandom::fill(&mut memory).unwrap();
    let mut buf = vec![0u8; RUN];
    let hot = vec![3u8; RUN];

    println!("| AES-128-GCM, 200 MiB in 256 KiB runs | CPU ms | GB/s |");
    println!("|---|---:|---:|");
    measure("ring, seal in place, in cache", || {
        timed(|| {
            for i in 0..TOTAL / RUN {
                let n = rg::Nonce::assume_unique_for_key(nonce(i));
                let tag = ring
                    .seal_in_place_separate_tag(n, rg::Aad::empty(), &mut buf)
                    .unwrap();
                black_box(tag.as_ref());
            }
        })
    });
    measure("AWS-LC, seal into a buffer, in cache", || {
        timed(|| {
            for i in 0..TOTAL / RUN {
                black_box(
                    aws.seal_into(&nonce(i), &[], SharedBytes::from_slice(&hot), &mut buf)
                        .unwrap(),
                );
            }
        })
    });
    // Opening needs valid tags: seal the buffer once per nonce beforehand would cost a
    // seal each; instead open what was just sealed and subtract the seal (above).
    measure("ring, seal + open in place, in cache", || {
        timed(|| {
            for i in 0..TOTAL / RUN {
                let tag = ring
                    .seal_in_place_separate_tag(
                        rg::Nonce::assume_unique_for_key(nonce(i)),
                        rg::Aad::empty(),
                        &mut buf,
                    )
                    .unwrap();
                ring.open_in_place_separate_tag(
                    rg::Nonce::assume_unique_for_key(nonce(i)),
                    rg::Aad::empty(),
                    tag,
                    &mut buf,
                    0..,
                )
                .unwrap();
            }
        })
    });
    measure("AWS-LC, seal + open in place, in cache", || {
        timed(|| {
            for i in 0..TOTAL / RUN {
                let tag = aws.seal_in_place(&nonce(i), &[], &mut buf).unwrap();
                aws_open
                    .open_in_place_separate_tag(
                        lc::Nonce::assume_unique_for_key(nonce(i)),
                        lc::Aad::empty(),
                        &tag,
                        &mut buf,
                    )
                    .unwrap();
            }
        })
    });
    measure("copy only, from 200 MiB (the old sender's gather)", || {
        timed(|| {
            for run in memory.chunks(RUN) {
                buf.copy_from_slice(run);
                black_box(&buf);
            }
        })
    });
    measure(
        "ring, copy then seal in place, from 200 MiB (the old sender)",
        || {
            timed(|| {
                for (i, run) in memory.chunks(RUN).enumerate() {
                    buf.copy_from_slice(run);
                    let n = rg::Nonce::assume_unique_for_key(nonce(i));
                    let tag = ring
                        .seal_in_place_separate_tag(n, rg::Aad::empty(), &mut buf)
                        .unwrap();
                    black_box(tag.as_ref());
                }
            })
        },
    );
    measure(
        "AWS-LC, seal into a buffer, from 200 MiB (the sender now)",
        || {
            timed(|| {
                for (i, run) in memory.chunks(RUN).enumerate() {
                    black_box(
                        aws.seal_into(&nonce(i), &[], SharedBytes::from_slice(run), &mut buf)
                            .unwrap(),
                    );
                }
            })
        },
    );
    let mut ring_tags = Vec::new();
    measure(
        "ring, open in place, from 200 MiB (the old receiver)",
        || {
            ring_tags.clear();
            for (i, run) in memory.chunks_mut(RUN).enumerate() {
                let n = rg::Nonce::assume_unique_for_key(nonce(i));
                ring_tags.push(
                    ring.seal_in_place_separate_tag(n, rg::Aad::empty(), run)
                        .unwrap(),
                );
            }
            timed(|| {
                for (i, run) in memory.chunks_mut(RUN).enumerate() {
                    let n = rg::Nonce::assume_unique_for_key(nonce(i));
                    ring.open_in_place_separate_tag(n, rg::Aad::empty(), ring_tags[i], run, 0..)
                        .unwrap();
                }
            })
        },
    );
    let mut aws_tags = Vec::new();
    measure(
        "AWS-LC, open in place, from 200 MiB (the receiver now)",
        || {
            aws_tags.clear();
            for (i, run) in memory.chunks_mut(RUN).enumerate() {
                aws_tags.push(aws.seal_in_place(&nonce(i), &[], run).unwrap());
            }
            timed(|| {
                for (i, run) in memory.chunks_mut(RUN).enumerate() {
                    aws_open
                        .open_in_place_separate_tag(
                            lc::Nonce::assume_unique_for_key(nonce(i)),
                            lc::Aad::empty(),
                            &aws_tags[i],
                            run,
                        )
                        .unwrap();
                }
            })
        },
    );
    aegis_lines(&memory, &mut buf);
}

/// The same runs through AEGIS: in cache; and out of the 200 MiB, sealed straight into
/// the buffer (the crate's incremental `Encryptor`, as the stream seals with AES-GCM) or
/// copied first and sealed in place.
fn aegis_lines(memory: &[u8], buf: &mut [u8]) {
    use aegis::aegis128l::Aegis128L;
    use aegis::aegis128x4::Aegis128X4;
    let key = [7u8; 16];
    let nonce = |i: usize| {
        let mut n = [0u8; 16];
        n[8..].copy_from_slice(&(i as u64).to_be_bytes());
        n
    };
    measure("AEGIS-128L, seal + open in place, in cache", || {
        timed(|| {
            for i in 0..TOTAL / RUN {
                let tag = Aegis128L::<16>::new(&key, &nonce(i)).encrypt_in_place(buf, &[]);
                Aegis128L::<16>::new(&key, &nonce(i))
                    .decrypt_in_place(buf, &tag, &[])
                    .unwrap();
            }
        })
    });
    measure("AEGIS-128X4, seal + open in place, in cache", || {
        timed(|| {
            for i in 0..TOTAL / RUN {
                let tag = Aegis128X4::<16>::new(&key, &nonce(i)).encrypt_in_place(buf, &[]);
                Aegis128X4::<16>::new(&key, &nonce(i))
                    .decrypt_in_place(buf, &tag, &[])
                    .unwrap();
            }
        })
    });
    measure("AEGIS-128X4, seal into a buffer, from 200 MiB", || {
        timed(|| {
            for (i, run) in memory.chunks(RUN).enumerate() {
                let mut seal = Aegis128X4::<16>::new(&key, &nonce(i)).encryptor(&[]);
                seal.update(run, buf);
                black_box(seal.finalize());
            }
        })
    });
    measure("AEGIS-128X4, copy then seal in place, from 200 MiB", || {
        timed(|| {
            for (i, run) in memory.chunks(RUN).enumerate() {
                buf.copy_from_slice(run);
                black_box(Aegis128X4::<16>::new(&key, &nonce(i)).encrypt_in_place(buf, &[]));
            }
        })
    });
}
